package dev.marie.client;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.ErrorInfo;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import java.util.Map;

/**
 * A call that failed: the gRPC status code plus the {@code google.rpc.ErrorInfo} Marie's services
 * send in {@code grpc-status-details-bin} (a stable UPPER_SNAKE reason, a domain and string
 * metadata such as {@code field}). Without one, the reason is the code's name.
 */
public final class MarieException extends RuntimeException {
  private final Status.Code code;
  private final String reason;
  private final String domain;
  private final Map<String, String> metadata;

  MarieException(
      Status.Code code, String message, String reason, String domain, Map<String, String> metadata,
      Throwable cause) {
    super(code + ": " + message + " (" + reason + ")", cause);
    this.code = code;
    this.reason = reason;
    this.domain = domain;
    this.metadata = Map.copyOf(metadata);
  }

  /** Decode a failed call (StatusRuntimeException or anything carrying a status). */
  public static MarieException from(Throwable error) {
    if (error instanceof MarieException known) {
      return known;
    }
    Status status = Status.fromThrowable(error);
    String message = status.getDescription() == null ? status.getCode().name() : status.getDescription();
    com.google.rpc.Status rich = StatusProto.fromThrowable(error);
    if (rich != null) {
      for (Any detail : rich.getDetailsList()) {
        if (detail.is(ErrorInfo.class)) {
          try {
            ErrorInfo info = detail.unpack(ErrorInfo.class);
            return new MarieException(
                status.getCode(), message, info.getReason(), info.getDomain(),
                info.getMetadataMap(), error);
          } catch (InvalidProtocolBufferException ignored) {
            // A malformed detail: fall through to the bare status.
          }
        }
      }
    }
    return new MarieException(status.getCode(), message, status.getCode().name(), "", Map.of(), error);
  }

  /** The gRPC status code. */
  public Status.Code code() {
    return code;
  }

  /** ErrorInfo's reason, e.g. INVALID_ARGUMENT or MODEL_NOT_FOUND. */
  public String reason() {
    return reason;
  }

  public String domain() {
    return domain;
  }

  public Map<String, String> metadata() {
    return metadata;
  }

  /** The request field a bad request names, or null. */
  public String field() {
    return metadata.get("field");
  }

}
