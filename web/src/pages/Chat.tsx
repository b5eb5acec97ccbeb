import {
  ActionIcon,
  Alert,
  Badge,
  Button,
  Card,
  Group,
  Loader,
  Modal,
  Paper,
  Stack,
  Text,
  Textarea,
  TextInput,
  Title,
} from "@mantine/core";
import { type KeyboardEvent, useCallback, useEffect, useRef, useState } from "react";
import type { Api, Conversation, Message, Model, Page, SearchHit } from "../api";
import { ApiError, query } from "../api";
import { type Answer, applyEvent, EMPTY_ANSWER } from "../chatStream";
import { Highlighted } from "../Highlight";
import { Markdown } from "../Markdown";
import { ModelSelector } from "../ModelSelector";

function errorText(exc: unknown): string {
  return exc instanceof Error ? exc.message : String(exc);
}

function isAbort(exc: unknown): boolean {
  return exc instanceof DOMException && exc.name === "AbortError";
}

/** Pick a model (and a title, for a new conversation). */
function ModelDialog(props: {
  api: Api;
  opened: boolean;
  title: string;
  initial: string | null;
  withTitle: boolean;
  action: string;
  onClose: () => void;
  onConfirm: (model: Model, title: string) => Promise<void>;
}) {
  const [model, setModel] = useState<Model | null>(null);
  const [title, setTitle] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  return (
    <Modal opened={props.opened} onClose={props.onClose} title={props.title} size="lg">
      <Stack>
        {props.withTitle && (
          <TextInput
            label="Title"
            placeholder="New conversation"
            value={title}
            onChange={(e) => setTitle(e.currentTarget.value)}
          />
        )}
        <ModelSelector
          api={props.api}
          selected={model?.full_id ?? props.initial}
          onSelect={setModel}
        />
        {error && (
          <Alert color="red" role="alert">
            {error}
          </Alert>
        )}
        <Group justify="flex-end">
          <Button variant="default" onClick={props.onClose}>
            Cancel
          </Button>
          <Button
            disabled={model === null}
            loading={busy}
            onClick={async () => {
              if (model === null) return;
              setBusy(true);
              setError(null);
              try {
                await props.onConfirm(model, title.trim());
                setModel(null);
                setTitle("");
              } catch (exc) {
                setError(errorText(exc));
              } finally {
                setBusy(false);
              }
            }}
          >
            {props.action}
          </Button>
        </Group>
      </Stack>
    </Modal>
  );
}

function MessageView({ role, content }: { role: string; content: string }) {
  return (
    <Paper
      className={`message ${role}`}
      withBorder
      p="sm"
      data-role={role}
      aria-label={role === "user" ? "Your message" : "Answer"}
    >
      {role === "user" ? (
        <Text className="pre-wrap">{content}</Text>
      ) : (
        <Markdown text={content} />
      )}
    </Paper>
  );
}

export function ChatPage({ api }: { api: Api }) {
  const [conversations, setConversations] = useState<Conversation[]>([]);
  const [listError, setListError] = useState<string | null>(null);
  const [current, setCurrent] = useState<Conversation | null>(null);
  const [messages, setMessages] = useState<Message[]>([]);
  const [draft, setDraft] = useState("");
  const [pending, setPending] = useState<{ question: string; answer: Answer } | null>(null);
  const [stopped, setStopped] = useState(false);
  const [sendError, setSendError] = useState<string | null>(null);
  const [dialog, setDialog] = useState<"new" | "model" | null>(null);
  const [renaming, setRenaming] = useState<Conversation | null>(null);
  const [newTitle, setNewTitle] = useState("");
  const [deleting, setDeleting] = useState<Conversation | null>(null);
  const [search, setSearch] = useState("");
  const [hits, setHits] = useState<SearchHit[] | null>(null);
  const abort = useRef<AbortController | null>(null);
  const log = useRef<HTMLDivElement | null>(null);

  const loadConversations = useCallback(async () => {
    try {
      const page = await api.get<Page<Conversation>>("/api/conversations?order=updated&limit=100");
      setConversations(page.data);
      setListError(null);
    } catch (exc) {
      setListError(errorText(exc));
    }
  }, [api]);

  const loadMessages = useCallback(
    async (conversation: Conversation) => {
      const page = await api.get<Page<Message>>(
        `/api/conversations/${encodeURIComponent(conversation.id)}/messages?limit=200`,
      );
      setMessages(page.data);
    },
    [api],
  );

  useEffect(() => {
    void loadConversations();
  }, [loadConversations]);

  useEffect(() => {
    log.current?.scrollTo({ top: log.current.scrollHeight });
  }, [messages, pending]);

  const open = async (conversation: Conversation) => {
    abort.current?.abort();
    setCurrent(conversation);
    setPending(null);
    setSendError(null);
    setMessages([]);
    try {
      await loadMessages(conversation);
    } catch (exc) {
      setSendError(errorText(exc));
    }
  };

  const stop = () => {
    if (abort.current) {
      setStopped(true);
      abort.current.abort();
    }
  };

  const send = async () => {
    const content = draft.trim();
    if (!content || current === null || abort.current) return;
    const controller = new AbortController();
    abort.current = controller;
    if (pending !== null) {
      // A stopped or failed turn is shown locally; the gateway has stored
      // what was said of it meanwhile: show the stored history instead.
      try {
        await loadMessages(current);
      } catch {
        /* the old view stays */
      }
    }
    setDraft("");
    setStopped(false);
    setSendError(null);
    let answer: Answer = EMPTY_ANSWER;
    setPending({ question: content, answer });
    try {
      await api.stream(
        `/api/conversations/${encodeURIComponent(current.id)}/messages`,
        { content, stream: true },
        (data) => {
          answer = applyEvent(answer, data);
          setPending({ question: content, answer });
        },
        controller.signal,
      );
      setPending({ question: content, answer: { ...answer, done: true } });
      if (answer.error === null) {
        await loadMessages(current);
        setPending(null);
      }
    } catch (exc) {
      if (isAbort(exc)) {
        setPending({ question: content, answer: { ...answer, done: true } });
      } else if (exc instanceof ApiError && answer.text === "") {
        // Refused before any answer: nothing was stored, give the text back.
        setPending(null);
        setDraft(content);
        setSendError(exc.message);
      } else {
        setPending({ question: content, answer: { ...answer, error: errorText(exc), done: true } });
      }
    } finally {
      abort.current = null;
      void loadConversations();
    }
  };

  const onKeyDown = (e: KeyboardEvent<HTMLTextAreaElement>) => {
    if (e.key === "Enter" && !e.shiftKey && !e.nativeEvent.isComposing) {
      e.preventDefault();
      void send();
    }
  };

  useEffect(() => {
    const onEscape = (e: globalThis.KeyboardEvent) => {
      if (e.key === "Escape" && abort.current) stop();
    };
    window.addEventListener("keydown", onEscape);
    return () => window.removeEventListener("keydown", onEscape);
  }, []);

  const runSearch = async (text: string) => {
    if (!text.trim()) {
      setHits(null);
      return;
    }
    try {
      const page = await api.get<Page<SearchHit>>(`/api/search${query({ q: text, limit: 30 })}`);
      setHits(page.data);
      setListError(null);
    } catch (exc) {
      setListError(errorText(exc));
    }
  };

  const streaming = pending !== null && !pending.answer.done;

  return (
    <div className="chat-layout">
      <Stack className="sidebar" gap="xs" component="nav" aria-label="Conversations">
        <Button onClick={() => setDialog("new")}>New conversation</Button>
        <form
          role="search"
          onSubmit={(e) => {
            e.preventDefault();
            void runSearch(search);
          }}
        >
          <TextInput
            label="Search messages"
            placeholder="Search, then Enter"
            value={search}
            onChange={(e) => {
              setSearch(e.currentTarget.value);
              if (!e.currentTarget.value) setHits(null);
            }}
          />
        </form>
        {listError && (
          <Alert color="red" role="alert">
            {listError}
          </Alert>
        )}
        {hits !== null ? (
          <Stack gap={4} aria-label="Search results" data-testid="search-results">
            <Text size="sm" c="dimmed">
              {hits.length} result{hits.length === 1 ? "" : "s"}
            </Text>
            {hits.map((hit) => (
              <Card
                key={hit.id}
                withBorder
                padding="xs"
                component="button"
                className="search-hit"
                onClick={() => {
                  const found = conversations.find((c) => c.id === hit.conversation_id);
                  if (found) void open(found);
                }}
              >
                <Text size="xs" fw={700}>
                  {hit.conversation_title || "Untitled"} · {hit.role}
                </Text>
                <Text size="sm" className="snippet">
                  <Highlighted snippet={hit.snippet} />
                </Text>
              </Card>
            ))}
          </Stack>
        ) : (
          <Stack gap={2} data-testid="conversation-list">
            {conversations.length === 0 && <Text c="dimmed">No conversation yet.</Text>}
            {conversations.map((c) => (
              <Group
                key={c.id}
                gap={2}
                wrap="nowrap"
                className="conversation-item"
                data-active={c.id === current?.id || undefined}
              >
                <Button
                  variant={c.id === current?.id ? "light" : "subtle"}
                  className="conversation-button"
                  flex={1}
                  miw={0}
                  onClick={() => void open(c)}
                  aria-current={c.id === current?.id ? "true" : undefined}
                >
                  <Text truncate size="sm">
                    {c.title || "Untitled"}
                  </Text>
                </Button>
                <ActionIcon
                  variant="subtle"
                  aria-label={`Rename ${c.title || "Untitled"}`}
                  onClick={() => {
                    setRenaming(c);
                    setNewTitle(c.title);
                  }}
                >
                  ✎
                </ActionIcon>
                <ActionIcon
                  variant="subtle"
                  color="red"
                  aria-label={`Delete ${c.title || "Untitled"}`}
                  onClick={() => setDeleting(c)}
                >
                  ✕
                </ActionIcon>
              </Group>
            ))}
          </Stack>
        )}
      </Stack>

      <section className="chat-main" aria-label="Conversation">
        {current === null ? (
          <Stack align="flex-start">
            <Title order={2}>Chat</Title>
            <Text c="dimmed">Start a new conversation or open one from the list.</Text>
          </Stack>
        ) : (
          <>
            <Group justify="space-between" mb="sm" wrap="wrap">
              <Title order={2} size="h3">
                {current.title || "Untitled"}
              </Title>
              <Group gap="xs">
                <Badge size="lg" variant="light" tt="none" data-testid="conversation-model">
                  {current.model || "no model"}
                </Badge>
                <Button
                  size="xs"
                  variant="default"
                  onClick={() => setDialog("model")}
                  disabled={streaming}
                >
                  Change model
                </Button>
              </Group>
            </Group>
            <div className="chat-log" ref={log} aria-live="polite" data-testid="chat-log">
              <Stack gap="sm">
                {messages.map((m) => (
                  <MessageView key={m.id} role={m.role} content={m.content} />
                ))}
                {pending && (
                  <>
                    <MessageView role="user" content={pending.question} />
                    <Paper withBorder p="sm" className="message assistant" data-testid="pending-answer">
                      {pending.answer.text ? (
                        <Markdown text={pending.answer.text} />
                      ) : (
                        !pending.answer.done && <Loader size="xs" aria-label="Waiting for the answer" />
                      )}
                      {pending.answer.done && stopped && (
                        <Text size="xs" c="dimmed" data-testid="stopped">
                          Stopped.
                        </Text>
                      )}
                      {pending.answer.error && (
                        <Alert color="red" role="alert" mt="xs" title="The answer failed">
                          {pending.answer.error}
                        </Alert>
                      )}
                    </Paper>
                  </>
                )}
              </Stack>
            </div>
            {sendError && (
              <Alert color="red" role="alert" mt="xs">
                {sendError}
              </Alert>
            )}
            <Group mt="sm" align="flex-end" wrap="nowrap">
              <Textarea
                flex={1}
                label="Message"
                description="Enter sends, Shift+Enter starts a new line, Esc stops the answer."
                autosize
                minRows={2}
                maxRows={8}
                value={draft}
                onChange={(e) => setDraft(e.currentTarget.value)}
                onKeyDown={onKeyDown}
              />
              {streaming ? (
                <Button color="red" onClick={stop}>
                  Stop
                </Button>
              ) : (
                <Button onClick={() => void send()} disabled={!draft.trim()}>
                  Send
                </Button>
              )}
            </Group>
          </>
        )}
      </section>

      <ModelDialog
        api={api}
        opened={dialog === "new"}
        title="New conversation"
        initial={null}
        withTitle
        action="Create conversation"
        onClose={() => setDialog(null)}
        onConfirm={async (model, title) => {
          const created = await api.json<Conversation>("POST", "/api/conversations", {
            title: title || `Chat with ${model.name}`,
            model: model.full_id,
          });
          setDialog(null);
          await loadConversations();
          await open(created);
        }}
      />
      <ModelDialog
        api={api}
        opened={dialog === "model"}
        title="Change model"
        initial={current?.model ?? null}
        withTitle={false}
        action="Use this model"
        onClose={() => setDialog(null)}
        onConfirm={async (model) => {
          if (current === null) return;
          const updated = await api.json<Conversation>(
            "PATCH",
            `/api/conversations/${encodeURIComponent(current.id)}`,
            { model: model.full_id },
          );
          setCurrent(updated);
          setDialog(null);
          void loadConversations();
        }}
      />
      <Modal opened={renaming !== null} onClose={() => setRenaming(null)} title="Rename conversation">
        <form
          onSubmit={async (e) => {
            e.preventDefault();
            if (renaming === null) return;
            try {
              const updated = await api.json<Conversation>(
                "PATCH",
                `/api/conversations/${encodeURIComponent(renaming.id)}`,
                { title: newTitle.trim() },
              );
              if (current?.id === updated.id) setCurrent(updated);
              setRenaming(null);
              await loadConversations();
            } catch (exc) {
              setListError(errorText(exc));
              setRenaming(null);
            }
          }}
        >
          <Stack>
            <TextInput
              label="Title"
              value={newTitle}
              onChange={(e) => setNewTitle(e.currentTarget.value)}
              data-autofocus
            />
            <Group justify="flex-end">
              <Button variant="default" onClick={() => setRenaming(null)}>
                Cancel
              </Button>
              <Button type="submit">Rename</Button>
            </Group>
          </Stack>
        </form>
      </Modal>
      <Modal opened={deleting !== null} onClose={() => setDeleting(null)} title="Delete conversation?">
        <Stack>
          <Text>
            “{deleting?.title || "Untitled"}” and all its messages will be deleted. This cannot be
            undone.
          </Text>
          <Group justify="flex-end">
            <Button variant="default" onClick={() => setDeleting(null)}>
              Cancel
            </Button>
            <Button
              color="red"
              onClick={async () => {
                if (deleting === null) return;
                try {
                  await api.json("DELETE", `/api/conversations/${encodeURIComponent(deleting.id)}`);
                  if (current?.id === deleting.id) {
                    setCurrent(null);
                    setMessages([]);
                    setPending(null);
                  }
                } catch (exc) {
                  setListError(errorText(exc));
                }
                setDeleting(null);
                await loadConversations();
              }}
            >
              Delete
            </Button>
          </Group>
        </Stack>
      </Modal>
    </div>
  );
}
