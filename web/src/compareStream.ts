/** `/api/compare` events, folded into one result per model. */

export interface ArmResult {
  model: string;
  text: string;
  done: boolean;
  error: string | null;
  firstTokenMs: number | null;
  totalMs: number | null;
  promptTokens: number | null;
  completionTokens: number | null;
}

export function emptyArms(models: string[]): ArmResult[] {
  return models.map((model) => ({
    model,
    text: "",
    done: false,
    error: null,
    firstTokenMs: null,
    totalMs: null,
    promptTokens: null,
    completionTokens: null,
  }));
}

interface CompareEvent {
  type?: "delta" | "done" | "error";
  index?: number;
  delta?: { content?: string | null };
  usage?: { prompt_tokens: number; completion_tokens: number } | null;
  latency?: { first_token_ms: number | null; total_ms: number };
  error?: { message?: string };
}

/** The results after one more event; events of unknown models are ignored. */
export function applyCompareEvent(arms: ArmResult[], data: unknown): ArmResult[] {
  const ev = data as CompareEvent;
  const index = ev.index;
  if (index === undefined || index < 0 || index >= arms.length) return arms;
  const arm = arms[index];
  if (arm === undefined) return arms;
  let next: ArmResult = arm;
  if (ev.type === "delta") next = { ...arm, text: arm.text + (ev.delta?.content ?? "") };
  else if (ev.type === "done")
    next = {
      ...arm,
      done: true,
      firstTokenMs: ev.latency?.first_token_ms ?? null,
      totalMs: ev.latency?.total_ms ?? null,
      promptTokens: ev.usage?.prompt_tokens ?? null,
      completionTokens: ev.usage?.completion_tokens ?? null,
    };
  else if (ev.type === "error")
    next = { ...arm, done: true, error: ev.error?.message ?? "This model failed." };
  const out = arms.slice();
  out[index] = next;
  return out;
}
