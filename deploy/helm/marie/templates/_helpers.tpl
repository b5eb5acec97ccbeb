{{/* Labels of every object. */}}
{{- define "marie.labels" -}}
app.kubernetes.io/part-of: marie
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The Secret holding keys: the chart's or the user's own. */}}
{{- define "marie.secretName" -}}
{{- if .Values.secrets.existingSecret -}}{{ .Values.secrets.existingSecret }}{{- else -}}marie-secrets{{- end -}}
{{- end -}}

{{/* An optional variable from the Secret. */}}
{{- define "marie.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef: { name: {{ include "marie.secretName" .root }}, key: {{ .name }}, optional: true }
{{- end -}}

{{/* What every Marie service gets. */}}
{{- define "marie.commonEnv" -}}
- { name: MARIE_LOG_LEVEL, value: {{ .Values.logLevel | quote }} }
- { name: MARIE_GRACE_SECONDS, value: {{ .Values.graceSeconds | quote }} }
- { name: MARIE_DRAIN_DELAY_SECONDS, value: {{ .Values.drainDelaySeconds | quote }} }
{{- end -}}

{{/* The OpenSearch store, for auth and memory. */}}
{{- define "marie.opensearchEnv" -}}
- { name: OPENSEARCH_URL, value: {{ required "opensearch.url is required" .Values.opensearch.url | quote }} }
{{- end -}}

{{/*
One Marie service: Deployment, Service, HPA and PodDisruptionBudget.
Arguments: root (the chart's context), name, port, probe ("grpc" or "http"),
headless (a headless Service: clients balance over the pods' addresses),
env (extra variables, YAML), volumes and mounts (YAML, optional).
*/}}
{{- define "marie.service" -}}
{{- $root := .root -}}
{{- $cfg := index $root.Values.services .name -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  labels:
    {{- include "marie.labels" $root | nindent 4 }}
    app.kubernetes.io/name: {{ .name }}
spec:
  {{- if not $cfg.autoscaling.enabled }}
  replicas: {{ $cfg.replicas }}
  {{- end }}
  selector:
    matchLabels:
      app.kubernetes.io/instance: {{ $root.Release.Name }}
      app.kubernetes.io/name: {{ .name }}
  strategy:
    # One replica at a time, the new one ready before an old one stops.
    type: RollingUpdate
    rollingUpdate: { maxSurge: 1, maxUnavailable: 0 }
  template:
    metadata:
      labels:
        {{- include "marie.labels" $root | nindent 8 }}
        app.kubernetes.io/name: {{ .name }}
      {{- if .checksum }}
      annotations:
        checksum/config: {{ .checksum }}
      {{- end }}
    spec:
      # SIGTERM: NOT_SERVING (readiness fails, Services drop the pod) while
      # new calls are still taken for MARIE_DRAIN_DELAY_SECONDS, then calls in
      # flight drain within MARIE_GRACE_SECONDS, then the process exits.
      terminationGracePeriodSeconds: {{ add $root.Values.graceSeconds $root.Values.drainDelaySeconds 5 }}
      automountServiceAccountToken: false
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        runAsGroup: 10001
        fsGroup: 10001
        seccompProfile: { type: RuntimeDefault }
      containers:
        - name: {{ .name }}
          image: {{ printf "%s-%s:%s" $root.Values.image.repository .name $root.Values.image.tag | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          ports:
            - name: {{ .probe }}
              containerPort: {{ .port }}
          env:
            {{- include "marie.commonEnv" $root | nindent 12 }}
            {{- .env | nindent 12 }}
            {{- if .spool }}
            # Usage records wait here until auth has them: a container that
            # is killed or crashes loses none (its restart sends them).
            - { name: MARIE_USAGE_SPOOL_DIR, value: /data/usage-spool }
            {{- end }}
          {{- if eq .probe "grpc" }}
          # The gRPC health service: SERVING once ready, NOT_SERVING while
          # starting or draining.
          readinessProbe:
            grpc: { port: {{ .port }} }
            periodSeconds: 5
            failureThreshold: 1
          livenessProbe:
            grpc: { port: {{ .port }} }
            initialDelaySeconds: 30
            periodSeconds: 10
            failureThreshold: 6
          {{- else }}
          # /readyz: 200 only when the gateway's providers and auth serve.
          readinessProbe:
            httpGet: { path: /readyz, port: {{ .port }} }
            periodSeconds: 5
            failureThreshold: 1
          livenessProbe:
            httpGet: { path: /healthz, port: {{ .port }} }
            initialDelaySeconds: 30
            periodSeconds: 10
            failureThreshold: 6
          {{- end }}
          resources:
            {{- toYaml $cfg.resources | nindent 12 }}
          securityContext:
            readOnlyRootFilesystem: true
            allowPrivilegeEscalation: false
            capabilities: { drop: [ALL] }
          volumeMounts:
            - { name: tmp, mountPath: /tmp }
            {{- if .spool }}
            - { name: usage-spool, mountPath: /data/usage-spool }
            {{- end }}
            {{- with .mounts }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {}
        {{- if .spool }}
        # Outlives the container (not the pod): a restarted container sends
        # what its predecessor left.
        - name: usage-spool
          emptyDir: {}
        {{- end }}
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ .name }}
  labels:
    {{- include "marie.labels" $root | nindent 4 }}
    app.kubernetes.io/name: {{ .name }}
spec:
  {{- if .headless }}
  # Headless: DNS answers with every ready pod's address, so gRPC clients
  # (round_robin) and Envoy (STRICT_DNS) balance call by call, not
  # connection by connection.
  clusterIP: None
  {{- end }}
  selector:
    app.kubernetes.io/instance: {{ $root.Release.Name }}
    app.kubernetes.io/name: {{ .name }}
  ports:
    - name: {{ .probe }}
      port: {{ .port }}
      targetPort: {{ .port }}
      {{- if eq .probe "grpc" }}
      appProtocol: grpc
      {{- end }}
{{- if $cfg.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ .name }}
  labels:
    {{- include "marie.labels" $root | nindent 4 }}
spec:
  scaleTargetRef: { apiVersion: apps/v1, kind: Deployment, name: {{ .name }} }
  minReplicas: {{ $cfg.autoscaling.minReplicas }}
  maxReplicas: {{ $cfg.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target: { type: Utilization, averageUtilization: {{ $cfg.autoscaling.targetCPUUtilizationPercentage }} }
{{- end }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  labels:
    {{- include "marie.labels" $root | nindent 4 }}
spec:
  maxUnavailable: {{ $cfg.pdb.maxUnavailable }}
  selector:
    matchLabels:
      app.kubernetes.io/instance: {{ $root.Release.Name }}
      app.kubernetes.io/name: {{ .name }}
{{- end -}}
