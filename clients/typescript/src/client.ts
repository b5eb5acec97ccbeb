// MarieClient: one long-lived HTTP/2 session to Marie's ProviderService.

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import {
  Code,
  createClient,
  type CallOptions,
  type Client,
  type Interceptor,
  type Transport,
} from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import {
  FinishReason,
  ProviderService,
  Role,
  StreamChatCompletionRequestSchema,
  type ChatMessageSchema,
  type CreateEmbeddingsRequestSchema,
  type ListModelsRequestSchema,
  type ListModelsResponse,
  type ModelInfo,
  type Provider,
  type ProviderHealth,
  type StreamChatCompletionResponse,
  type ToolCallDelta,
  type Usage,
  type CreateEmbeddingsResponse,
} from "./gen/marie/providers/v1/provider_service_pb.js";
import { AuthService } from "./gen/marie/auth/v1/auth_service_pb.js";
import { MemoryService } from "./gen/marie/memory/v1/memory_service_pb.js";
import { MarieError } from "./errors.js";

export const DEFAULT_TIMEOUT_MS = 10_000;
export const DEFAULT_STREAM_TIMEOUT_MS = 600_000;

/** Unary calls that wait for a model: a lookup's deadline would cut them off. */
const MODEL_CALLS = new Set([
  "marie.providers.v1.ProviderService/CreateChatCompletion",
  "marie.providers.v1.ProviderService/CreateEmbeddings",
  "marie.memory.v1.MemoryService/AddMemories",
]);

export interface MarieClientOptions {
  /** `host:port` of the providers service (or of Envoy). */
  address: string;
  /** Sent as `authorization: Bearer <apiKey>` on every call. */
  apiKey: string;
  /** Use TLS (https); default false. */
  tls?: boolean;
  /** Deadline of lookups (unary calls that do not wait for a model); default 10 s. */
  timeoutMs?: number;
  /**
   * Deadline of a chat stream and of the unary calls that wait for a model
   * (CreateChatCompletion, CreateEmbeddings, AddMemories); default 600 s.
   */
  streamTimeoutMs?: number;
}

/** Per-call options: a deadline and an AbortSignal that cancels the call. */
export interface RequestOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

const ROLES: Record<string, Role> = {
  system: Role.SYSTEM,
  user: Role.USER,
  assistant: Role.ASSISTANT,
  tool: Role.TOOL,
  developer: Role.DEVELOPER,
};

type ChatMessageInit = MessageInitShape<typeof ChatMessageSchema>;
type ChatRequestInit = MessageInitShape<typeof StreamChatCompletionRequestSchema>;

/** A chat message; `role` may be OpenAI's name: `{role: "user", content: "Hi"}`. */
export interface MessageLike {
  role: keyof typeof ROLES | Role;
  content?: string;
  name?: string;
  toolCallId?: string;
  toolCalls?: ChatMessageInit["toolCalls"];
  parts?: ChatMessageInit["parts"];
}

export interface ChatRequest {
  model: string;
  messages: MessageLike[];
  provider?: string;
  temperature?: number;
  topP?: number;
  topK?: number;
  maxTokens?: number;
  stop?: string[];
  seed?: bigint;
  user?: string;
  /** The whole request, for options not listed here; the fields above are then ignored. */
  raw?: ChatRequestInit;
}

/** A whole reply assembled from its chunks. */
export interface ChatResult {
  id: string;
  model: string;
  provider: string;
  content: string;
  finishReason: FinishReason;
  usage?: Usage;
  toolCalls: ToolCallDelta[];
}

function toMessage(message: MessageLike): ChatMessageInit {
  const role = typeof message.role === "string" ? ROLES[message.role] : message.role;
  if (role === undefined) {
    throw new TypeError(`unknown role ${String(message.role)}; one of ${Object.keys(ROLES).join(", ")}`);
  }
  return { ...message, role };
}

export class MarieClient {
  /** The generated client, for anything the helpers below do not cover (the key and the default deadlines apply). */
  readonly providers: Client<typeof ProviderService>;
  /**
   * AuthService and MemoryService on the same session (the key and the default
   * deadlines apply; `MarieError.from` decodes failures): for a client of Envoy (one
   * address for every routed service) or of that service's own address.
   */
  readonly auth: Client<typeof AuthService>;
  readonly memory: Client<typeof MemoryService>;
  readonly timeoutMs: number;
  readonly streamTimeoutMs: number;
  private readonly sessions: Http2SessionManager;

  constructor(options: MarieClientOptions) {
    if (!options.apiKey) throw new TypeError("apiKey is required");
    const baseUrl = `${options.tls ? "https" : "http"}://${options.address}`;
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.streamTimeoutMs = options.streamTimeoutMs ?? DEFAULT_STREAM_TIMEOUT_MS;
    const authorization = `Bearer ${options.apiKey}`;
    const withKey: Interceptor = (next) => (request) => {
      request.header.set("authorization", authorization);
      return next(request);
    };
    this.sessions = new Http2SessionManager(baseUrl);
    // One session; a unary call without a deadline of its own gets the one
    // its method needs. Streams get none from connect (see streamChat).
    const over = (defaultTimeoutMs?: number) =>
      createGrpcTransport({
        baseUrl,
        interceptors: [withKey],
        sessionManager: this.sessions,
        defaultTimeoutMs,
      });
    const lookups = over(this.timeoutMs);
    const modelCalls = over(this.streamTimeoutMs);
    const streams = over(undefined);
    const transport: Transport = {
      unary: (method, ...rest) =>
        (MODEL_CALLS.has(`${method.parent.typeName}/${method.name}`) ? modelCalls : lookups).unary(
          method,
          ...rest,
        ),
      stream: (method, ...rest) => streams.stream(method, ...rest),
    };
    this.providers = createClient(ProviderService, transport);
    this.auth = createClient(AuthService, transport);
    this.memory = createClient(MemoryService, transport);
  }

  /** Close the HTTP/2 session (calls in flight are aborted). */
  close(): void {
    this.sessions.abort();
  }

  private options(options: RequestOptions | undefined, defaultMs: number): CallOptions {
    return { timeoutMs: options?.timeoutMs ?? defaultMs, signal: options?.signal };
  }

  private async unary<T>(call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (error) {
      throw MarieError.from(error);
    }
  }

  async listProviders(options?: RequestOptions): Promise<Provider[]> {
    const response = await this.unary(() =>
      this.providers.listProviders({}, this.options(options, this.timeoutMs)),
    );
    return response.providers;
  }

  async getProviderHealth(provider = "", options?: RequestOptions): Promise<ProviderHealth[]> {
    const response = await this.unary(() =>
      this.providers.getProviderHealth({ provider }, this.options(options, this.timeoutMs)),
    );
    return response.providers;
  }

  /** Every model (`models`) and the providers that failed to list (`providerErrors`). */
  listModels(
    request: MessageInitShape<typeof ListModelsRequestSchema> = {},
    options?: RequestOptions,
  ): Promise<ListModelsResponse> {
    return this.unary(() => this.providers.listModels(request, this.options(options, this.timeoutMs)));
  }

  /** One model's details; `model` is `provider/name` or a bare name. */
  async getModel(model: string, options?: RequestOptions & { provider?: string }): Promise<ModelInfo> {
    const response = await this.unary(() =>
      this.providers.getModel(
        { model, provider: options?.provider ?? "" },
        this.options(options, this.timeoutMs),
      ),
    );
    if (response.model === undefined) throw new MarieError(2, "GetModel returned no model");
    return response.model;
  }

  async searchModels(
    query: string,
    options?: RequestOptions & { provider?: string; limit?: number },
  ): Promise<ModelInfo[]> {
    const response = await this.unary(() =>
      this.providers.searchModels(
        { query, provider: options?.provider ?? "", limit: options?.limit ?? 0 },
        this.options(options, this.timeoutMs),
      ),
    );
    return response.models;
  }

  /**
   * Stream a chat completion: an async iterable of chunks. Breaking out of
   * `for await`, or aborting `options.signal`, cancels the call on the
   * server, which stops the model upstream. Failures throw MarieError.
   */
  async *streamChat(
    request: ChatRequest,
    options?: RequestOptions,
  ): AsyncGenerator<StreamChatCompletionResponse, void, undefined> {
    const message = request.raw ?? fromChatRequest(request);
    // Our own controller: leaving the loop early aborts the HTTP/2 stream.
    // The deadline is ours too: connect's own stream deadline timer outlives
    // a stream cancelled by its consumer (connect 2.1) and holds the process
    // open, so the server gets it as grpc-timeout and an unref'd timer here
    // enforces it.
    const timeoutMs = options?.timeoutMs ?? this.streamTimeoutMs;
    const abort = new AbortController();
    const onAbort = () => abort.abort(options?.signal?.reason);
    if (options?.signal?.aborted) onAbort();
    options?.signal?.addEventListener("abort", onAbort, { once: true });
    const deadline = setTimeout(
      () => abort.abort(new MarieError(Code.DeadlineExceeded, `no reply within ${timeoutMs} ms`)),
      timeoutMs,
    );
    deadline.unref();
    try {
      const chunks = this.providers.streamChatCompletion(message, {
        headers: { "grpc-timeout": `${Math.max(1, Math.ceil(timeoutMs))}m` },
        signal: abort.signal,
      });
      for await (const chunk of chunks) {
        yield chunk;
      }
    } catch (error) {
      throw MarieError.from(abort.signal.reason instanceof MarieError ? abort.signal.reason : error);
    } finally {
      clearTimeout(deadline);
      options?.signal?.removeEventListener("abort", onAbort);
      abort.abort();
    }
  }

  /** Stream a chat completion to its end and assemble the reply. */
  async chat(
    request: ChatRequest,
    options?: RequestOptions,
  ): Promise<ChatResult> {
    return collectChat(this.streamChat(request, options));
  }

  async createEmbeddings(
    request: MessageInitShape<typeof CreateEmbeddingsRequestSchema>,
    options?: RequestOptions,
  ): Promise<CreateEmbeddingsResponse> {
    // A model call: a lookup's deadline would cut a large batch off.
    return this.unary(() =>
      this.providers.createEmbeddings(request, this.options(options, this.streamTimeoutMs)),
    );
  }
}

function fromChatRequest(request: ChatRequest) {
  return create(StreamChatCompletionRequestSchema, {
    model: request.model,
    provider: request.provider ?? "",
    user: request.user ?? "",
    messages: request.messages.map(toMessage),
    sampling: {
      temperature: request.temperature,
      topP: request.topP,
      topK: request.topK,
      maxTokens: request.maxTokens,
      stop: request.stop ?? [],
      seed: request.seed,
    },
  });
}

/** Read a chat stream to its end and assemble the reply. */
export async function collectChat(stream: AsyncIterable<StreamChatCompletionResponse>): Promise<ChatResult> {
  const result: ChatResult = {
    id: "",
    model: "",
    provider: "",
    content: "",
    finishReason: FinishReason.UNSPECIFIED,
    toolCalls: [],
  };
  const parts: string[] = [];
  for await (const chunk of stream) {
    result.id ||= chunk.id;
    result.model ||= chunk.model;
    result.provider ||= chunk.provider;
    parts.push(chunk.content);
    for (const delta of chunk.toolCalls) {
      const known = result.toolCalls[delta.index];
      if (known === undefined) {
        result.toolCalls[delta.index] = { ...delta };
      } else {
        known.id ||= delta.id;
        known.type ||= delta.type;
        known.name ||= delta.name;
        known.arguments += delta.arguments;
      }
    }
    if (chunk.finishReason !== FinishReason.UNSPECIFIED) result.finishReason = chunk.finishReason;
    if (chunk.usage !== undefined) result.usage = chunk.usage;
  }
  result.content = parts.join("");
  return result;
}
