import { BarChart } from "@mantine/charts";
import { Alert, Card, Group, SegmentedControl, Stack, Text, Title } from "@mantine/core";
import { useEffect, useState } from "react";
import type { Api, UsageReport } from "../api";
import { ApiError } from "../api";

const SERIES = [
  { name: "prompt_tokens", label: "Prompt tokens", color: "blue.6" },
  { name: "completion_tokens", label: "Completion tokens", color: "teal.6" },
];

export function UsagePage({ api }: { api: Api }) {
  const [days, setDays] = useState("30");
  const [byDay, setByDay] = useState<UsageReport | null>(null);
  const [byModel, setByModel] = useState<UsageReport | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    const from = new Date(Date.now() - Number(days) * 86_400_000).toISOString();
    const params = `from=${encodeURIComponent(from)}`;
    // Only an admin key sees every key's usage: ask for the key list first,
    // which refuses other keys plainly.
    api
      .get("/api/keys?page_size=1")
      .then(() =>
        Promise.all([
          api.get<UsageReport>(`/api/usage?group_by=day&${params}`),
          api.get<UsageReport>(`/api/usage?group_by=model&${params}`),
        ]),
      )
      .then(([day, model]) => {
        setByDay(day);
        setByModel(model);
        setError(null);
      })
      .catch((exc: unknown) => {
        setByDay(null);
        setByModel(null);
        setError(
          exc instanceof ApiError && exc.status === 403
            ? `Usage of every key is for keys with the 'admin' scope. (${exc.message})`
            : exc instanceof Error
              ? exc.message
              : String(exc),
        );
      });
  }, [api, days]);

  return (
    <Stack>
      <Group justify="space-between">
        <Title order={2}>Usage</Title>
        <SegmentedControl
          aria-label="Period"
          value={days}
          onChange={setDays}
          data={[
            { value: "7", label: "7 days" },
            { value: "30", label: "30 days" },
            { value: "90", label: "90 days" },
          ]}
        />
      </Group>
      {error && (
        <Alert color="red" role="alert" title="Refused">
          {error}
        </Alert>
      )}
      {byDay && (
        <Text data-testid="usage-total">
          {byDay.total.requests} requests, {byDay.total.total_tokens} tokens, {byDay.total.errors} errors;
          latency p50 {Math.round(byDay.total.latency_p50_ms)} ms, p95 {Math.round(byDay.total.latency_p95_ms)} ms.
        </Text>
      )}
      {byDay && (
        <Card withBorder>
          <Title order={3} size="h4" mb="sm">
            Tokens by day
          </Title>
          <BarChart h={260} data={byDay.groups} dataKey="group" type="stacked" series={SERIES} withLegend />
        </Card>
      )}
      {byModel && (
        <Card withBorder>
          <Title order={3} size="h4" mb="sm">
            Tokens by model
          </Title>
          <BarChart
            h={Math.max(160, byModel.groups.length * 48)}
            data={byModel.groups}
            dataKey="group"
            orientation="vertical"
            yAxisProps={{ width: 180 }}
            type="stacked"
            series={SERIES}
            withLegend
          />
        </Card>
      )}
    </Stack>
  );
}
