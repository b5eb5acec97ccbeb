import { Alert, Badge, Button, Group, Loader, MultiSelect, Paper, Stack, Text, Textarea, Title } from "@mantine/core";
import { type KeyboardEvent, useEffect, useRef, useState } from "react";
import type { Api, ModelsByProvider } from "../api";
import { applyCompareEvent, type ArmResult, emptyArms } from "../compareStream";
import { Markdown } from "../Markdown";

function ms(value: number | null): string {
  return value === null ? "—" : `${Math.round(value)} ms`;
}

export function ComparePage({ api }: { api: Api }) {
  const [options, setOptions] = useState<{ group: string; items: string[] }[]>([]);
  const [models, setModels] = useState<string[]>([]);
  const [prompt, setPrompt] = useState("");
  const [arms, setArms] = useState<ArmResult[]>([]);
  const [error, setError] = useState<string | null>(null);
  const [running, setRunning] = useState(false);
  const abort = useRef<AbortController | null>(null);

  useEffect(() => {
    api
      .get<ModelsByProvider>("/api/models")
      .then((listing) =>
        setOptions(
          Object.entries(listing.models).map(([provider, list]) => ({
            group: provider,
            items: list
              .filter((m) => !m.capabilities.length || m.capabilities.some((c) => c === "chat" || c === "completion"))
              .map((m) => m.full_id),
          })),
        ),
      )
      .catch((exc: unknown) => setError(exc instanceof Error ? exc.message : String(exc)));
  }, [api]);

  useEffect(() => {
    const onEscape = (e: globalThis.KeyboardEvent) => {
      if (e.key === "Escape") abort.current?.abort();
    };
    window.addEventListener("keydown", onEscape);
    return () => window.removeEventListener("keydown", onEscape);
  }, []);

  const run = async () => {
    if (models.length < 2 || !prompt.trim() || abort.current) return;
    const controller = new AbortController();
    abort.current = controller;
    setError(null);
    setRunning(true);
    let current = emptyArms(models);
    setArms(current);
    try {
      await api.stream(
        "/api/compare",
        { models, messages: [{ role: "user", content: prompt.trim() }] },
        (data) => {
          current = applyCompareEvent(current, data);
          setArms(current);
        },
        controller.signal,
      );
    } catch (exc) {
      if (!(exc instanceof DOMException && exc.name === "AbortError")) {
        setError(exc instanceof Error ? exc.message : String(exc));
      }
    } finally {
      abort.current = null;
      setRunning(false);
    }
  };

  const onKeyDown = (e: KeyboardEvent<HTMLTextAreaElement>) => {
    if (e.key === "Enter" && !e.shiftKey && !e.nativeEvent.isComposing) {
      e.preventDefault();
      void run();
    }
  };

  return (
    <Stack>
      <Title order={2}>Compare models</Title>
      <MultiSelect
        label="Models (2 to 8)"
        data={options}
        value={models}
        onChange={setModels}
        searchable
        maxValues={8}
        placeholder="Pick models"
      />
      <Textarea
        label="Prompt"
        description="Enter runs it on every model, Shift+Enter starts a new line, Esc stops."
        autosize
        minRows={2}
        value={prompt}
        onChange={(e) => setPrompt(e.currentTarget.value)}
        onKeyDown={onKeyDown}
      />
      <Group>
        <Button onClick={() => void run()} disabled={running || models.length < 2 || !prompt.trim()}>
          Compare
        </Button>
        {running && (
          <Button color="red" variant="light" onClick={() => abort.current?.abort()}>
            Stop
          </Button>
        )}
      </Group>
      {error && (
        <Alert color="red" role="alert">
          {error}
        </Alert>
      )}
      <div className="compare-grid">
        {arms.map((arm) => (
          <Paper key={arm.model} withBorder p="sm" aria-label={`Answer of ${arm.model}`} data-testid="compare-arm">
            <Group justify="space-between" mb="xs">
              <Text fw={700} size="sm">
                {arm.model}
              </Text>
              {!arm.done && running && <Loader size="xs" aria-label="Streaming" />}
            </Group>
            <Group gap={4} mb="xs">
              <Badge variant="light" size="sm" title="Time to first token">
                first {ms(arm.firstTokenMs)}
              </Badge>
              <Badge variant="light" size="sm" title="Total time">
                total {ms(arm.totalMs)}
              </Badge>
              <Badge variant="light" size="sm" color="teal" title="Prompt / completion tokens">
                {arm.promptTokens ?? "—"} / {arm.completionTokens ?? "—"} tokens
              </Badge>
            </Group>
            {arm.text && <Markdown text={arm.text} />}
            {arm.error && (
              <Alert color="red" role="alert">
                {arm.error}
              </Alert>
            )}
          </Paper>
        ))}
      </div>
    </Stack>
  );
}
