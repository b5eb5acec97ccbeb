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
import type { Api, ApiKey, CreatedKey, KeyLimits, Page } from "../api";
import { ApiError } from "../api";

const SCOPES = ["chat", "models:read", "embeddings", "memory", "admin"];

interface KeyForm {
  name: string;
  owner: string;
  scopes: string[];
  allowed_models: string[];
  limits: KeyLimits;
}

const EMPTY_FORM: KeyForm = {
  name: "",
  owner: "",
  scopes: [],
  allowed_models: [],
  limits: { requests_per_minute: 0, tokens_per_minute: 0, tokens_per_day: 0, max_concurrent_requests: 0 },
};

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
        <Table.ScrollContainer minWidth={640}>
          <Table striped highlightOnHover data-testid="keys-table">
            <Table.Thead>
              <Table.Tr>
                <Table.Th>Name</Table.Th>
                <Table.Th>Key</Table.Th>
                <Table.Th>Owner</Table.Th>
                <Table.Th>Scopes</Table.Th>
                <Table.Th>State</Table.Th>
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
          setCreated(await api.json<CreatedKey>("POST", "/api/keys", body));
          setCreating(null);
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
