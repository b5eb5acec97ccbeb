import {
  Alert,
  Badge,
  Button,
  Code,
  CopyButton,
  Group,
  Modal,
  MultiSelect,
  NumberInput,
  Stack,
  Table,
  TagsInput,
  Text,
  TextInput,
  Title,
} from "@mantine/core";
import { useCallback, useEffect, useState } from "react";
import type { Api, ApiKey, Budget, CreatedKey, KeyLimits, Page, UsageReport } from "../api";
import { ApiError, monthStart } from "../api";

const SCOPES = ["chat", "models:read", "embeddings", "memory", "admin"];

interface KeyForm {
  name: string;
  owner: string;
  scopes: string[];
  allowed_models: string[];
  limits: KeyLimits;
  /** USD per UTC day and month, as typed ("" : no limit). */
  daily_usd: string;
  monthly_usd: string;
}

const EMPTY_FORM: KeyForm = {
  name: "",
  owner: "",
  scopes: [],
  allowed_models: [],
  limits: { requests_per_minute: 0, tokens_per_minute: 0, tokens_per_day: 0, max_concurrent_requests: 0 },
  daily_usd: "",
  monthly_usd: "",
};

/** What a key spent this month and its monthly budget, for the keys table. */
interface Spend {
  spent: string;
  budget: Budget | null;
}

/** Sets a key's budget when the form changed it. */
async function saveBudget(api: Api, keyId: string, form: KeyForm, before: Budget | null) {
  const daily = form.daily_usd.trim();
  const monthly = form.monthly_usd.trim();
  if (daily === (before?.daily_usd ?? "") && monthly === (before?.monthly_usd ?? "")) return;
  await api.json("PATCH", `/api/budgets/keys/${encodeURIComponent(keyId)}`, {
    daily_usd: daily,
    monthly_usd: monthly,
  });
}

function errorText(exc: unknown): string {
  if (exc instanceof ApiError && exc.status === 403) {
    return `This key may not manage keys: it lacks the 'admin' scope. (${exc.message})`;
  }
  return exc instanceof Error ? exc.message : String(exc);
}

function Secret({ created, onClose }: { created: CreatedKey | null; onClose: () => void }) {
  return (
    <Modal opened={created !== null} onClose={onClose} title="The new key" size="lg">
      <Stack>
        <Text>Copy it now: it is shown only once and cannot be read again.</Text>
        <Code block data-testid="new-key">
          {created?.key}
        </Code>
        <Group justify="flex-end">
          <CopyButton value={created?.key ?? ""}>
            {({ copied, copy }) => (
              <Button onClick={copy} color={copied ? "teal" : undefined}>
                {copied ? "Copied" : "Copy key"}
              </Button>
            )}
          </CopyButton>
          <Button variant="default" onClick={onClose}>
            Done
          </Button>
        </Group>
      </Stack>
    </Modal>
  );
}

const LIMIT_LABELS: [keyof KeyLimits, string][] = [
  ["requests_per_minute", "Requests per minute"],
  ["tokens_per_minute", "Tokens per minute"],
  ["tokens_per_day", "Tokens per day"],
  ["max_concurrent_requests", "Concurrent requests"],
];

function KeyDialog(props: {
  title: string;
  initial: KeyForm | null;
  action: string;
  onClose: () => void;
  onSave: (form: KeyForm) => Promise<void>;
}) {
  const [form, setForm] = useState<KeyForm>(EMPTY_FORM);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    if (props.initial) {
      setForm(props.initial);
      setError(null);
    }
  }, [props.initial]);
  return (
    <Modal opened={props.initial !== null} onClose={props.onClose} title={props.title} size="lg">
      <form
        onSubmit={async (e) => {
          e.preventDefault();
          setBusy(true);
          setError(null);
          try {
            await props.onSave(form);
          } catch (exc) {
            setError(errorText(exc));
          } finally {
            setBusy(false);
          }
        }}
      >
        <Stack>
          <TextInput label="Name" required value={form.name} onChange={(e) => setForm({ ...form, name: e.currentTarget.value })} data-autofocus />
          <TextInput label="Owner (user or team)" value={form.owner} onChange={(e) => setForm({ ...form, owner: e.currentTarget.value })} />
          <MultiSelect
            label="Scopes"
            description="None chosen: every scope but admin."
            data={SCOPES}
            value={form.scopes}
            onChange={(scopes) => setForm({ ...form, scopes })}
          />
          <TagsInput
            label="Allowed models"
            description="Model ids or 'provider/*'; none: every model. Enter adds one."
            value={form.allowed_models}
            onChange={(allowed_models) => setForm({ ...form, allowed_models })}
          />
          <div className="form-grid">
            <TextInput
              label="Daily budget (USD)"
              description="Spend per UTC day; empty: no limit"
              inputMode="decimal"
              value={form.daily_usd}
              onChange={(e) => setForm({ ...form, daily_usd: e.currentTarget.value })}
            />
            <TextInput
              label="Monthly budget (USD)"
              description="Spend per UTC month; empty: no limit"
              inputMode="decimal"
              value={form.monthly_usd}
              onChange={(e) => setForm({ ...form, monthly_usd: e.currentTarget.value })}
            />
            {LIMIT_LABELS.map(([field, label]) => (
              <NumberInput
                key={field}
                label={label}
                description="0: no limit"
                min={0}
                allowDecimal={false}
                value={form.limits[field]}
                onChange={(value) =>
                  setForm({ ...form, limits: { ...form.limits, [field]: typeof value === "number" ? value : 0 } })
                }
              />
            ))}
          </div>
          {error && (
            <Alert color="red" role="alert">
              {error}
            </Alert>
          )}
          <Group justify="flex-end">
            <Button variant="default" onClick={props.onClose}>
              Cancel
            </Button>
            <Button type="submit" loading={busy}>
              {props.action}
            </Button>
          </Group>
        </Stack>
      </form>
    </Modal>
  );
}

export function KeysPage({ api }: { api: Api }) {
  const [keys, setKeys] = useState<ApiKey[] | null>(null);
  const [spend, setSpend] = useState<Map<string, Spend>>(new Map());
  const [error, setError] = useState<string | null>(null);
  const [creating, setCreating] = useState<KeyForm | null>(null);
  const [editing, setEditing] = useState<{ key: ApiKey; form: KeyForm } | null>(null);
  const [created, setCreated] = useState<CreatedKey | null>(null);
  const [confirm, setConfirm] = useState<{ key: ApiKey; action: "revoke" | "rotate" } | null>(null);

  const load = useCallback(async () => {
    try {
      const page = await api.get<Page<ApiKey>>("/api/keys?include_inactive=true&page_size=500");
      setKeys(page.data);
      setError(null);
      // Spend this month per key (from the ledger) beside its budget, if any.
      const [budgets, usage] = await Promise.all([
        api.get<Page<Budget>>("/api/budgets?page_size=500"),
        api.get<UsageReport>(`/api/usage?group_by=key&from=${encodeURIComponent(monthStart())}`),
      ]);
      const byKey = new Map<string, Spend>();
      for (const g of usage.groups) if (g.group) byKey.set(g.group, { spent: g.cost, budget: null });
      for (const b of budgets.data) {
        if (b.key_id) byKey.set(b.key_id, { spent: b.spent_this_month_usd, budget: b });
      }
      setSpend(byKey);
    } catch (exc) {
      setKeys(null);
      setError(errorText(exc));
    }
  }, [api]);

  useEffect(() => {
    void load();
  }, [load]);

  const act = async () => {
    if (confirm === null) return;
    const { key, action } = confirm;
    setConfirm(null);
    try {
      if (action === "revoke") await api.json("DELETE", `/api/keys/${encodeURIComponent(key.id)}`);
      else setCreated(await api.json<CreatedKey>("POST", `/api/keys/${encodeURIComponent(key.id)}/rotate`, {}));
    } catch (exc) {
      setError(errorText(exc));
    }
    await load();
  };

  return (
    <Stack>
      <Group justify="space-between">
        <Title order={2}>API keys</Title>
        {keys !== null && <Button onClick={() => setCreating({ ...EMPTY_FORM })}>Create key</Button>}
      </Group>
      {error && (
        <Alert color="red" role="alert" title="Refused">
          {error}
        </Alert>
      )}
      {keys !== null && (
        <Table.ScrollContainer minWidth={880}>
          <Table striped highlightOnHover data-testid="keys-table">
            <Table.Thead>
              <Table.Tr>
                <Table.Th>Name</Table.Th>
                <Table.Th>Key</Table.Th>
                <Table.Th>Owner</Table.Th>
                <Table.Th>Scopes</Table.Th>
                <Table.Th>State</Table.Th>
                <Table.Th>Spent / budget this month (USD)</Table.Th>
                <Table.Th>Actions</Table.Th>
              </Table.Tr>
            </Table.Thead>
            <Table.Tbody>
              {keys.map((k) => (
                <Table.Tr key={k.id} data-key-name={k.name}>
                  <Table.Td>{k.name}</Table.Td>
                  <Table.Td>
                    <Code>{k.display}</Code>
                  </Table.Td>
                  <Table.Td>{k.owner || "—"}</Table.Td>
                  <Table.Td>{k.scopes.length ? k.scopes.join(", ") : "all but admin"}</Table.Td>
                  <Table.Td>
                    <Badge color={k.state === "active" ? "green" : "gray"} data-testid="key-state">
                      {k.state}
                    </Badge>
                  </Table.Td>
                  <Table.Td data-testid="key-spend">
                    {spend.get(k.id)?.spent ?? "0"}
                    {spend.get(k.id)?.budget?.monthly_usd ? ` / ${spend.get(k.id)?.budget?.monthly_usd}` : ""}
                    {spend.get(k.id)?.budget?.daily_usd ? ` (daily ${spend.get(k.id)?.budget?.daily_usd})` : ""}
                  </Table.Td>
                  <Table.Td>
                    {k.state === "active" && (
                      <Group gap={4} wrap="nowrap">
                        <Button
                          size="xs"
                          variant="default"
                          aria-label={`Edit ${k.name}`}
                          onClick={() =>
                            setEditing({
                              key: k,
                              form: {
                                name: k.name,
                                owner: k.owner,
                                scopes: k.scopes,
                                allowed_models: k.allowed_models,
                                limits: k.limits,
                                daily_usd: spend.get(k.id)?.budget?.daily_usd ?? "",
                                monthly_usd: spend.get(k.id)?.budget?.monthly_usd ?? "",
                              },
                            })
                          }
                        >
                          Edit
                        </Button>
                        <Button size="xs" variant="default" aria-label={`Rotate ${k.name}`} onClick={() => setConfirm({ key: k, action: "rotate" })}>
                          Rotate
                        </Button>
                        <Button size="xs" color="red" variant="light" aria-label={`Revoke ${k.name}`} onClick={() => setConfirm({ key: k, action: "revoke" })}>
                          Revoke
                        </Button>
                      </Group>
                    )}
                  </Table.Td>
                </Table.Tr>
              ))}
            </Table.Tbody>
          </Table>
        </Table.ScrollContainer>
      )}
      <KeyDialog
        title="Create key"
        action="Create"
        initial={creating}
        onClose={() => setCreating(null)}
        onSave={async (form) => {
          const body = {
            name: form.name.trim(),
            owner: form.owner.trim() || undefined,
            scopes: form.scopes,
            allowed_models: form.allowed_models,
            limits: form.limits,
          };
          const made = await api.json<CreatedKey>("POST", "/api/keys", body);
          setCreated(made);
          setCreating(null);
          try {
            await saveBudget(api, made.api_key.id, form, null);
          } catch (exc) {
            setError(`The key was created, but its budget was not set: ${errorText(exc)}`);
          }
          await load();
        }}
      />
      <KeyDialog
        title="Edit key"
        action="Save"
        initial={editing?.form ?? null}
        onClose={() => setEditing(null)}
        onSave={async (form) => {
          if (editing === null) return;
          await api.json("PATCH", `/api/keys/${encodeURIComponent(editing.key.id)}`, {
            name: form.name.trim(),
            owner: form.owner.trim(),
            scopes: form.scopes,
            allowed_models: form.allowed_models,
            limits: form.limits,
          });
          await saveBudget(api, editing.key.id, form, spend.get(editing.key.id)?.budget ?? null);
          setEditing(null);
          await load();
        }}
      />
      <Secret created={created} onClose={() => setCreated(null)} />
      <Modal
        opened={confirm !== null}
        onClose={() => setConfirm(null)}
        title={confirm?.action === "revoke" ? "Revoke key?" : "Rotate key?"}
      >
        <Stack>
          <Text>
            {confirm?.action === "revoke"
              ? `“${confirm.key.name}” stops working at once. This cannot be undone.`
              : `“${confirm?.key.name}” gets a new secret; the old one stops working now.`}
          </Text>
          <Group justify="flex-end">
            <Button variant="default" onClick={() => setConfirm(null)}>
              Cancel
            </Button>
            <Button color="red" onClick={() => void act()}>
              {confirm?.action === "revoke" ? "Revoke" : "Rotate"}
            </Button>
          </Group>
        </Stack>
      </Modal>
    </Stack>
  );
}
