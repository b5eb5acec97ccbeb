/** The gateway's REST API, as the console uses it. The key lives in the tab's sessionStorage. */

import { readEvents } from "./sse";

const KEY_STORAGE = "marie.apiKey";

export function storedKey(): string | null {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeKey(key: string | null): void {
  if (key === null) sessionStorage.removeItem(KEY_STORAGE);
  else sessionStorage.setItem(KEY_STORAGE, key);
}

/** An error answer (OpenAI's envelope) or a failed request. */
export class ApiError extends Error {
  readonly status: number;
  readonly code: string | null;
  constructor(status: number, message: string, code: string | null = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

interface Envelope {
  error?: { message?: string; code?: string | null };
}

export function errorFrom(status: number, body: unknown): ApiError {
  const error = (body as Envelope | null)?.error;
  return new ApiError(status, error?.message ?? `HTTP ${status}`, error?.code ?? null);
}

async function send(
  key: string,
  method: string,
  path: string,
  body?: unknown,
  signal?: AbortSignal,
): Promise<Response> {
  const headers: Record<string, string> = { authorization: `Bearer ${key}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  let response: Response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      credentials: "omit",
    });
  } catch (exc) {
    if (exc instanceof DOMException && exc.name === "AbortError") throw exc;
    throw new ApiError(0, "The gateway cannot be reached.");
  }
  if (!response.ok) {
    let parsed: unknown = null;
    try {
      parsed = await response.json();
    } catch {
      /* not JSON */
    }
    throw errorFrom(response.status, parsed);
  }
  return response;
}

/** A client bound to one key. */
export class Api {
  readonly key: string;
  constructor(key: string) {
    this.key = key;
  }

  async json<T>(method: string, path: string, body?: unknown): Promise<T> {
    const response = await send(this.key, method, path, body);
    return (await response.json()) as T;
  }

  get<T>(path: string): Promise<T> {
    return this.json<T>("GET", path);
  }

  /** POST a body and read the SSE answer, event by event, until `[DONE]` or an abort. */
  async stream(
    path: string,
    body: unknown,
    onData: (data: unknown) => void,
    signal: AbortSignal,
  ): Promise<void> {
    const response = await send(this.key, "POST", path, body, signal);
    if (response.body === null) throw new ApiError(502, "The answer has no body.");
    await readEvents(response.body, onData);
  }
}

export function query(params: Record<string, string | number | undefined>): string {
  const out = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== "") out.set(name, String(value));
  }
  const text = out.toString();
  return text ? `?${text}` : "";
}

// --- shapes ---------------------------------------------------------------

export type Capability = "chat" | "completion" | "embeddings" | "tools" | "vision";

export interface Model {
  id: string;
  name: string;
  provider: string;
  full_id: string;
  description: string | null;
  parameters: string | null;
  quantization: string | null;
  size: string | null;
  size_bytes: number | null;
  context_length: number | null;
  max_tokens: number | null;
  capabilities: Capability[];
  metadata: Record<string, unknown>;
}

export interface ModelsByProvider {
  models: Record<string, Model[]>;
  total: number;
  errors: { provider: string; reason: string; message: string }[];
}

/** The routing state of one operation of one model (its circuit breaker). */
export interface DeploymentState {
  model: string;
  operation: "chat" | "completions" | "embeddings" | "unknown";
  circuit: "closed" | "open" | "half_open" | "unknown";
  retry_at: string | null;
  consecutive_failures: number;
  in_flight: number;
  max_concurrency: number;
  background_in_flight: number;
  max_background_concurrency: number;
}

export interface ProviderHealth {
  /** degraded: it answers its probe, but requests to one of its models are refused. */
  status: "healthy" | "degraded" | "unhealthy" | "error" | "unknown";
  available: boolean;
  models_count: number;
  latency_ms: number | null;
  error: string | null;
  default_model: string | null;
  deployments?: DeploymentState[];
}

export type ProvidersHealth = Record<string, ProviderHealth>;

export interface Conversation {
  id: string;
  title: string;
  provider: string;
  model: string;
  message_count: number;
  created_at: number;
  updated_at: number;
}

export interface Message {
  id: string;
  conversation_id: string;
  role: "system" | "user" | "assistant" | "tool";
  content: string;
  model: string;
  metadata: Record<string, string>;
  created_at: number;
}

export interface Page<T> {
  data: T[];
  next_page_token: string;
}

export interface SearchHit extends Message {
  conversation_title: string;
  score: number;
  snippet: string;
}

export interface Memory {
  id: string;
  text: string;
  categories: string[];
  created_at: number;
  updated_at: number;
  score?: number;
}

export interface MemoryHistoryEntry {
  id: string;
  event: string;
  old_text: string;
  new_text: string;
  actor: string;
  created_at: number;
}

export interface KeyLimits {
  requests_per_minute: number;
  tokens_per_minute: number;
  tokens_per_day: number;
  max_concurrent_requests: number;
}

export interface ApiKey {
  id: string;
  name: string;
  owner: string;
  display: string;
  state: "active" | "revoked" | "expired";
  scopes: string[];
  allowed_models: string[];
  limits: KeyLimits;
  created_at: string | null;
  last_used_at: string | null;
}

export interface CreatedKey {
  key: string;
  api_key: ApiKey;
}

export interface UsageTotals {
  group: string | null;
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  errors: number;
  latency_p50_ms: number;
  latency_p95_ms: number;
  cached_prompt_tokens: number;
  /** USD, exact decimal text ("0.0315"). */
  cost: string;
  unpriced_requests: number;
}

export interface UsageReport {
  currency: string;
  total: UsageTotals;
  groups: UsageTotals[];
}

/** A key's or an owner's spend limits (USD, exact decimal text) and what it spent. */
export interface Budget {
  key_id: string | null;
  owner: string | null;
  currency: string;
  daily_usd: string | null;
  monthly_usd: string | null;
  spent_today_usd: string;
  spent_this_month_usd: string;
}

/** The first instant of this UTC month, ISO 8601. */
export function monthStart(now: Date = new Date()): string {
  return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1)).toISOString();
}
