import {
  Alert,
  Badge,
  Button,
  Card,
  Group,
  Loader,
  ScrollArea,
  Stack,
  Text,
  TextInput,
  Title,
  UnstyledButton,
} from "@mantine/core";
import { useCallback, useEffect, useMemo, useState } from "react";
import type { Api, Model, ModelsByProvider, ProvidersHealth } from "./api";
import { formatBytes, groupModels, HEALTH_COLOURS, refusals } from "./models";

function ModelBadges({ model }: { model: Model }) {
  const size = model.size ?? formatBytes(model.size_bytes);
  return (
    <Group gap={4} wrap="wrap">
      {model.parameters && (
        <Badge size="xs" variant="light" color="blue" title="Parameters">
          {model.parameters}
        </Badge>
      )}
      {model.quantization && (
        <Badge size="xs" variant="light" color="grape" title="Quantization">
          {model.quantization}
        </Badge>
      )}
      {size && (
        <Badge size="xs" variant="light" color="teal" title="Size">
          {size}
        </Badge>
      )}
      {model.capabilities.map((c) => (
        <Badge key={c} size="xs" variant="outline" color="gray" radius="xl">
          {c}
        </Badge>
      ))}
    </Group>
  );
}

export function ModelDetails({ model }: { model: Model }) {
  const family = typeof model.metadata.family === "string" ? model.metadata.family : "—";
  return (
    <Card withBorder padding="sm" aria-label="Model details" data-testid="model-details">
      <Title order={4}>{model.name}</Title>
      <Text size="sm" c="dimmed">
        {model.full_id}
      </Text>
      <ModelBadges model={model} />
      <dl className="details">
        <dt>Provider</dt>
        <dd>{model.provider}</dd>
        <dt>Context length</dt>
        <dd>{model.context_length ? model.context_length.toLocaleString("en") : "—"}</dd>
        <dt>Family</dt>
        <dd>{family}</dd>
        <dt>Description</dt>
        <dd>{model.description ?? "—"}</dd>
      </dl>
    </Card>
  );
}

interface Props {
  api: Api;
  selected: string | null;
  onSelect: (model: Model) => void;
}

/** The original design's ModelSelector: providers with health, searchable models by provider, details. */
export function ModelSelector({ api, selected, onSelect }: Props) {
  const [listing, setListing] = useState<ModelsByProvider | null>(null);
  const [health, setHealth] = useState<ProvidersHealth>({});
  const [error, setError] = useState<string | null>(null);
  const [loading, setLoading] = useState(false);
  const [search, setSearch] = useState("");

  const load = useCallback(
    async (refresh: boolean) => {
      setLoading(true);
      setError(null);
      try {
        const [models, providers] = await Promise.all([
          api.get<ModelsByProvider>(`/api/models${refresh ? "?refresh=true" : ""}`),
          api.get<ProvidersHealth>("/api/models/providers/health"),
        ]);
        setListing(models);
        setHealth(providers);
      } catch (exc) {
        setError(exc instanceof Error ? exc.message : String(exc));
      } finally {
        setLoading(false);
      }
    },
    [api],
  );

  useEffect(() => {
    void load(false);
  }, [load]);

  const groups = useMemo(() => (listing ? groupModels(listing, search) : []), [listing, search]);
  const current = useMemo(() => {
    if (!listing || !selected) return null;
    for (const models of Object.values(listing.models)) {
      const found = models.find((m) => m.full_id === selected);
      if (found) return found;
    }
    return null;
  }, [listing, selected]);

  // The listing is the catalogue; one model's own answer adds what only the
  // provider's details say (context length, capabilities, description).
  const [detailed, setDetailed] = useState<Model | null>(null);
  useEffect(() => {
    if (!current) return;
    let live = true;
    api
      .get<Model>(`/api/models/${encodeURIComponent(current.provider)}/${encodeURIComponent(current.name)}`)
      .then((m) => live && setDetailed(m))
      .catch(() => live && setDetailed(null));
    return () => {
      live = false;
    };
  }, [api, current]);

  return (
    <Stack gap="sm">
      <Group gap="xs" aria-label="Providers">
        {Object.entries(health).map(([name, h]) => (
          <Badge
            key={name}
            color={HEALTH_COLOURS[h.status] ?? "gray"}
            variant="dot"
            title={h.error ?? `${h.status}, ${h.models_count} models`}
            data-testid={`provider-${name}`}
          >
            {name}: {h.status}
          </Badge>
        ))}
        <Button size="compact-xs" variant="subtle" onClick={() => void load(true)} loading={loading}>
          Refresh
        </Button>
      </Group>
      {error && (
        <Alert color="red" role="alert" title="Models could not be listed">
          {error}
        </Alert>
      )}
      {Object.entries(health)
        .filter(([, h]) => refusals(h.deployments).length > 0)
        .map(([name, h]) => (
          <Alert key={`refusing-${name}`} color="yellow" title={`${name} is refusing some requests`}>
            {refusals(h.deployments).map((line) => (
              <Text key={line} size="sm">
                {line}
              </Text>
            ))}
          </Alert>
        ))}
      {listing?.errors.map((e) => (
        <Alert key={e.provider} color="orange" title={`${e.provider} is not answering`}>
          {e.message}
        </Alert>
      ))}
      <TextInput
        label="Search models"
        placeholder="name, family, capability…"
        value={search}
        onChange={(e) => setSearch(e.currentTarget.value)}
      />
      {loading && !listing ? (
        <Loader size="sm" aria-label="Loading models" />
      ) : (
        <ScrollArea.Autosize mah={320} type="auto">
          <Stack gap="xs" role="listbox" aria-label="Models">
            {groups.length === 0 && listing && <Text c="dimmed">No model matches.</Text>}
            {groups.map((group) => (
              <div key={group.provider} role="group" aria-label={group.provider}>
                <Text fw={700} size="sm" tt="uppercase" c="dimmed">
                  {group.provider}
                </Text>
                {group.models.map((m) => (
                  <UnstyledButton
                    key={m.full_id}
                    className="model-option"
                    role="option"
                    aria-selected={m.full_id === selected}
                    data-selected={m.full_id === selected || undefined}
                    onClick={() => onSelect(m)}
                  >
                    <Text size="sm" fw={500}>
                      {m.name}
                    </Text>
                    <ModelBadges model={m} />
                  </UnstyledButton>
                ))}
              </div>
            ))}
          </Stack>
        </ScrollArea.Autosize>
      )}
      {current && (
        <ModelDetails model={detailed?.full_id === current.full_id ? detailed : current} />
      )}
    </Stack>
  );
}
