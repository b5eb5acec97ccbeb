import { Alert, Badge, Button, Card, Group, Modal, Stack, Text, Textarea, TextInput, Timeline, Title } from "@mantine/core";
import { useCallback, useEffect, useState } from "react";
import type { Api, Memory, MemoryHistoryEntry, Page } from "../api";
import { query } from "../api";

function when(seconds: number): string {
  return new Date(seconds * 1000).toLocaleString();
}

function errorText(exc: unknown): string {
  return exc instanceof Error ? exc.message : String(exc);
}

export function MemoriesPage({ api }: { api: Api }) {
  const [memories, setMemories] = useState<Memory[]>([]);
  const [search, setSearch] = useState("");
  const [searched, setSearched] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const [editing, setEditing] = useState<Memory | null>(null);
  const [text, setText] = useState("");
  const [deleting, setDeleting] = useState<Memory | null>(null);
  const [forgetting, setForgetting] = useState(false);
  const [history, setHistory] = useState<{ memory: Memory; entries: MemoryHistoryEntry[] } | null>(null);

  const load = useCallback(async () => {
    try {
      const page = await api.get<Page<Memory>>("/api/memories?limit=100");
      setMemories(page.data);
      setSearched(false);
      setError(null);
    } catch (exc) {
      setError(errorText(exc));
    }
  }, [api]);

  useEffect(() => {
    void load();
  }, [load]);

  const runSearch = async () => {
    if (!search.trim()) {
      await load();
      return;
    }
    try {
      const page = await api.get<Page<Memory>>(`/api/memories/search${query({ q: search, top_k: 20 })}`);
      setMemories(page.data);
      setSearched(true);
      setError(null);
    } catch (exc) {
      setError(errorText(exc));
    }
  };

  const act = async (work: () => Promise<unknown>) => {
    try {
      await work();
    } catch (exc) {
      setError(errorText(exc));
    }
    if (searched) await runSearch();
    else await load();
  };

  return (
    <Stack>
      <Group justify="space-between">
        <Title order={2}>Memories</Title>
        <Button color="red" variant="light" onClick={() => setForgetting(true)}>
          Forget everything
        </Button>
      </Group>
      <form
        role="search"
        onSubmit={(e) => {
          e.preventDefault();
          void runSearch();
        }}
      >
        <Group align="flex-end">
          <TextInput
            flex={1}
            label="Search memories"
            value={search}
            onChange={(e) => setSearch(e.currentTarget.value)}
          />
          <Button type="submit">Search</Button>
        </Group>
      </form>
      {error && (
        <Alert color="red" role="alert">
          {error}
        </Alert>
      )}
      {memories.length === 0 && <Text c="dimmed">{searched ? "No memory matches." : "No memories yet."}</Text>}
      <Stack gap="xs" data-testid="memory-list">
        {memories.map((m) => (
          <Card key={m.id} withBorder padding="sm" data-testid="memory">
            <Group justify="space-between" wrap="nowrap" align="flex-start">
              <Stack gap={4}>
                <Text className="pre-wrap">{m.text}</Text>
                <Group gap={4}>
                  {m.score !== undefined && (
                    <Badge size="sm" variant="light" data-testid="memory-score">
                      score {m.score.toFixed(3)}
                    </Badge>
                  )}
                  {m.categories.map((c) => (
                    <Badge key={c} size="sm" variant="outline">
                      {c}
                    </Badge>
                  ))}
                  <Text size="xs" c="dimmed">
                    updated {when(m.updated_at)}
                  </Text>
                </Group>
              </Stack>
              <Group gap={4} wrap="nowrap">
                <Button
                  size="xs"
                  variant="default"
                  onClick={() => {
                    setEditing(m);
                    setText(m.text);
                  }}
                >
                  Edit
                </Button>
                <Button
                  size="xs"
                  variant="default"
                  onClick={async () => {
                    try {
                      const page = await api.get<Page<MemoryHistoryEntry>>(
                        `/api/memories/${encodeURIComponent(m.id)}/history`,
                      );
                      setHistory({ memory: m, entries: page.data });
                    } catch (exc) {
                      setError(errorText(exc));
                    }
                  }}
                >
                  History
                </Button>
                <Button size="xs" color="red" variant="light" onClick={() => setDeleting(m)}>
                  Delete
                </Button>
              </Group>
            </Group>
          </Card>
        ))}
      </Stack>

      <Modal opened={editing !== null} onClose={() => setEditing(null)} title="Edit memory">
        <form
          onSubmit={(e) => {
            e.preventDefault();
            const target = editing;
            setEditing(null);
            if (target)
              void act(() =>
                api.json("PATCH", `/api/memories/${encodeURIComponent(target.id)}`, { text: text.trim() }),
              );
          }}
        >
          <Stack>
            <Textarea label="Text" autosize minRows={2} value={text} onChange={(e) => setText(e.currentTarget.value)} data-autofocus />
            <Group justify="flex-end">
              <Button variant="default" onClick={() => setEditing(null)}>
                Cancel
              </Button>
              <Button type="submit" disabled={!text.trim()}>
                Save
              </Button>
            </Group>
          </Stack>
        </form>
      </Modal>
      <Modal opened={deleting !== null} onClose={() => setDeleting(null)} title="Delete memory?">
        <Stack>
          <Text>“{deleting?.text}” will be forgotten.</Text>
          <Group justify="flex-end">
            <Button variant="default" onClick={() => setDeleting(null)}>
              Cancel
            </Button>
            <Button
              color="red"
              onClick={() => {
                const target = deleting;
                setDeleting(null);
                if (target) void act(() => api.json("DELETE", `/api/memories/${encodeURIComponent(target.id)}`));
              }}
            >
              Delete
            </Button>
          </Group>
        </Stack>
      </Modal>
      <Modal opened={forgetting} onClose={() => setForgetting(false)} title="Forget every memory?">
        <Stack>
          <Text>All your memories will be deleted. This cannot be undone.</Text>
          <Group justify="flex-end">
            <Button variant="default" onClick={() => setForgetting(false)}>
              Cancel
            </Button>
            <Button
              color="red"
              onClick={() => {
                setForgetting(false);
                void act(() => api.json("DELETE", "/api/memories"));
              }}
            >
              Forget everything
            </Button>
          </Group>
        </Stack>
      </Modal>
      <Modal opened={history !== null} onClose={() => setHistory(null)} title="Memory history" size="lg">
        <Timeline bulletSize={14} lineWidth={2} data-testid="memory-history">
          {history?.entries.map((e) => (
            <Timeline.Item key={e.id} title={`${e.event} · ${when(e.created_at)}`}>
              {e.old_text && (
                <Text size="sm" c="dimmed" td="line-through">
                  {e.old_text}
                </Text>
              )}
              {e.new_text && <Text size="sm">{e.new_text}</Text>}
              <Text size="xs" c="dimmed">
                by {e.actor || "unknown"}
              </Text>
            </Timeline.Item>
          ))}
        </Timeline>
      </Modal>
    </Stack>
  );
}
