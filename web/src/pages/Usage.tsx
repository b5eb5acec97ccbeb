import { BarChart } from "@mantine/charts";
import { Alert, Card, Group, SegmentedControl, Stack, Table, Text, Title } from "@mantine/core";
import { useEffect, useState } from "react";
import type { Api, UsageReport, UsageTotals } from "../api";
import { ApiError } from "../api";

const SERIES = [
  { name: "prompt_tokens", label: "Prompt tokens", color: "blue.6" },
  { name: "completion_tokens", label: "Completion tokens", color: "teal.6" },
];
const COST_SERIES = [{ name: "cost_usd", label: "Cost (USD)", color: "grape.6" }];
const GROUPINGS = ["day", "model", "key", "owner"] as const;
type Grouping = (typeof GROUPINGS)[number];

/** Groups with their cost as a number, for charts only (tables show the exact text). */
function charted(groups: UsageTotals[]) {
  return groups.map((g) => ({ ...g, cost_usd: Number(g.cost) }));
}

function SpendTable({ title, report, testId }: { title: string; report: UsageReport; testId: string }) {
  return (
    <Card withBorder>
      <Title order={3} size="h4" mb="sm">
        {title}
      </Title>
      <Table.ScrollContainer minWidth={480}>
        <Table striped data-testid={testId}>
          <Table.Thead>
            <Table.Tr>
              <Table.Th>{title.replace("Spend by ", "")}</Table.Th>
              <Table.Th ta="right">Requests</Table.Th>
              <Table.Th ta="right">Tokens</Table.Th>
              <Table.Th ta="right">Cost ({report.currency})</Table.Th>
            </Table.Tr>
          </Table.Thead>
          <Table.Tbody>
            {report.groups.map((g) => (
              <Table.Tr key={g.group ?? ""}>
                <Table.Td>{g.group || "—"}</Table.Td>
                <Table.Td ta="right">{g.requests}</Table.Td>
                <Table.Td ta="right">{g.total_tokens}</Table.Td>
                <Table.Td ta="right">
                  {g.cost}
                  {g.unpriced_requests ? ` (${g.unpriced_requests} unpriced)` : ""}
                </Table.Td>
              </Table.Tr>
            ))}
          </Table.Tbody>
        </Table>
      </Table.ScrollContainer>
    </Card>
  );
}

export function UsagePage({ api }: { api: Api }) {
  const [days, setDays] = useState("30");
  const [reports, setReports] = useState<Record<Grouping, UsageReport> | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    const from = new Date(Date.now() - Number(days) * 86_400_000).toISOString();
    const params = `from=${encodeURIComponent(from)}`;
    // Only an admin key sees every key's usage: ask for the key list first,
    // which refuses other keys plainly.
    api
      .get("/api/keys?page_size=1")
      .then(() =>
        Promise.all(
          GROUPINGS.map(async (g) => [g, await api.get<UsageReport>(`/api/usage?group_by=${g}&${params}`)] as const),
        ),
      )
      .then((answers) => {
        setReports(Object.fromEntries(answers) as Record<Grouping, UsageReport>);
        setError(null);
      })
      .catch((exc: unknown) => {
        setReports(null);
        setError(
          exc instanceof ApiError && exc.status === 403
            ? `Usage of every key is for keys with the 'admin' scope. (${exc.message})`
            : exc instanceof Error
              ? exc.message
              : String(exc),
        );
      });
  }, [api, days]);

  const byDay = reports?.day ?? null;
  const byModel = reports?.model ?? null;
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
          {byDay.total.requests} requests, {byDay.total.total_tokens} tokens, {byDay.total.cost} {byDay.currency},{" "}
          {byDay.total.errors} errors; latency p50 {Math.round(byDay.total.latency_p50_ms)} ms, p95{" "}
          {Math.round(byDay.total.latency_p95_ms)} ms.
          {byDay.total.unpriced_requests > 0 &&
            ` ${byDay.total.unpriced_requests} requests were on models without a price (counted at 0).`}
        </Text>
      )}
      {byDay && (
        <Card withBorder>
          <Title order={3} size="h4" mb="sm">
            Cost by day ({byDay.currency})
          </Title>
          <BarChart h={220} data={charted(byDay.groups)} dataKey="group" series={COST_SERIES} />
        </Card>
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
      {reports && <SpendTable title="Spend by model" report={reports.model} testId="spend-by-model" />}
      {reports && <SpendTable title="Spend by key" report={reports.key} testId="spend-by-key" />}
      {reports && <SpendTable title="Spend by owner" report={reports.owner} testId="spend-by-owner" />}
    </Stack>
  );
}
