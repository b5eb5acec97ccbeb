package dev.marie.client;

import dev.marie.providers.v1.FinishReason;
import dev.marie.providers.v1.StreamChatCompletionResponse;
import dev.marie.providers.v1.ToolCallDelta;
import dev.marie.providers.v1.Usage;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/** A whole reply assembled from its chunks; {@code usage} may be null. */
public record ChatResult(
    String id, String model, String provider, String content, FinishReason finishReason,
    Usage usage, List<ToolCallDelta> toolCalls) {

  static final class Builder {
    String id = "";
    String model = "";
    String provider = "";
    FinishReason finishReason = FinishReason.FINISH_REASON_UNSPECIFIED;
    Usage usage;
    final Map<Integer, ToolCallDelta.Builder> toolCalls = new TreeMap<>();

    void first(StreamChatCompletionResponse chunk) {
      if (id.isEmpty()) {
        id = chunk.getId();
        model = chunk.getModel();
        provider = chunk.getProvider();
      }
    }

    void toolCall(ToolCallDelta delta) {
      ToolCallDelta.Builder known =
          toolCalls.computeIfAbsent(delta.getIndex(), i -> ToolCallDelta.newBuilder().setIndex(i));
      if (known.getId().isEmpty()) {
        known.setId(delta.getId());
      }
      if (known.getType().isEmpty()) {
        known.setType(delta.getType());
      }
      if (known.getName().isEmpty()) {
        known.setName(delta.getName());
      }
      known.setArguments(known.getArguments() + delta.getArguments());
    }

    ChatResult build(String content) {
      return new ChatResult(
          id, model, provider, content, finishReason, usage,
          toolCalls.values().stream().map(ToolCallDelta.Builder::build).toList());
    }
  }
}
