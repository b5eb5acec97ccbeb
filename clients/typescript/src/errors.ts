// Failed calls as one error type: the gRPC code plus Marie's ErrorInfo.
//
// Marie's services put a google.rpc.Status with an ErrorInfo (a stable
// UPPER_SNAKE reason, a domain and string metadata such as `field`) in the
// `grpc-status-details-bin` trailer; connect parses the Status and hands us
// its details undecoded, and ErrorInfo is small enough to decode here.

import { Code, ConnectError } from "@connectrpc/connect";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";

const ERROR_INFO_TYPE = "google.rpc.ErrorInfo";

/** google.rpc.ErrorInfo */
export interface ErrorInfo {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

/** Decode a serialized google.rpc.ErrorInfo (reason = 1, domain = 2, metadata = 3). */
export function decodeErrorInfo(bytes: Uint8Array): ErrorInfo {
  const reader = new BinaryReader(bytes);
  const info: ErrorInfo = { reason: "", domain: "", metadata: {} };
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 1 && wireType === WireType.LengthDelimited) {
      info.reason = reader.string();
    } else if (field === 2 && wireType === WireType.LengthDelimited) {
      info.domain = reader.string();
    } else if (field === 3 && wireType === WireType.LengthDelimited) {
      const entry = new BinaryReader(reader.bytes());
      let key = "";
      let value = "";
      while (entry.pos < entry.len) {
        const [entryField, entryType] = entry.tag();
        if (entryField === 1 && entryType === WireType.LengthDelimited) key = entry.string();
        else if (entryField === 2 && entryType === WireType.LengthDelimited) value = entry.string();
        else entry.skip(entryType, entryField);
      }
      info.metadata[key] = value;
    } else {
      reader.skip(wireType, field);
    }
  }
  return info;
}

/** The gRPC name of a code: Code.InvalidArgument -> "INVALID_ARGUMENT". */
export function codeName(code: Code): string {
  return (Code[code] ?? "UNKNOWN").replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/**
 * A call that failed. `code` is the gRPC status code (connect's `Code`, same
 * numbers), `codeName` its gRPC name; `reason`, `domain` and `metadata` come
 * from the ErrorInfo the service sent (without one, `reason` is `codeName`).
 * `field` is the request field a bad request names.
 */
export class MarieError extends Error {
  override name = "MarieError";
  readonly code: Code;
  readonly codeName: string;
  readonly reason: string;
  readonly domain: string;
  readonly metadata: Record<string, string>;
  readonly rawMessage: string;

  constructor(code: Code, message: string, info?: ErrorInfo, options?: { cause?: unknown }) {
    super(`${codeName(code)}: ${message}`, options);
    this.code = code;
    this.codeName = codeName(code);
    this.rawMessage = message;
    this.reason = info?.reason || this.codeName;
    this.domain = info?.domain ?? "";
    this.metadata = info?.metadata ?? {};
  }

  get field(): string | undefined {
    return this.metadata.field;
  }

  /** Any error from a call, as a MarieError (ConnectError's details decoded). */
  static from(error: unknown): MarieError {
    if (error instanceof MarieError) return error;
    const connect = ConnectError.from(error);
    let info: ErrorInfo | undefined;
    for (const detail of connect.details) {
      if ("type" in detail && detail.type === ERROR_INFO_TYPE && detail.value instanceof Uint8Array) {
        info = decodeErrorInfo(detail.value);
      }
    }
    return new MarieError(connect.code, connect.rawMessage, info, { cause: error });
  }
}
