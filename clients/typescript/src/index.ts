// Marie's TypeScript (Node) gRPC client: `new MarieClient({address, apiKey})`.
// The generated messages and service descriptors are re-exported as `pb`.

export { MarieClient, collectChat, DEFAULT_TIMEOUT_MS, DEFAULT_STREAM_TIMEOUT_MS } from "./client.js";
export type { MarieClientOptions, RequestOptions, ChatRequest, ChatResult, MessageLike } from "./client.js";
export { MarieError, decodeErrorInfo, codeName } from "./errors.js";
export type { ErrorInfo } from "./errors.js";
export { Code } from "@connectrpc/connect";
export * as pb from "./gen/marie/providers/v1/provider_service_pb.js";
export * as authPb from "./gen/marie/auth/v1/auth_service_pb.js";
export * as memoryPb from "./gen/marie/memory/v1/memory_service_pb.js";
export { Role, FinishReason, ModelCapability } from "./gen/marie/providers/v1/provider_service_pb.js";
export const VERSION = "1.0.0";
