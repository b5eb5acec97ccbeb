package dev.marie.client;

import dev.marie.providers.v1.FinishReason;
import dev.marie.providers.v1.StreamChatCompletionResponse;
import io.grpc.Context;
import java.util.Iterator;
import java.util.NoSuchElementException;

/**
 * One StreamChatCompletion call: an {@link Iterator} of chunks (and {@link Iterable}, for
 * for-each). {@link #close()} (try-with-resources) cancels the call on the server, which stops the
 * model upstream. Failures throw {@link MarieException} from {@code hasNext}/{@code next}.
 */
public final class ChatStream implements Iterator<StreamChatCompletionResponse>,
    Iterable<StreamChatCompletionResponse>, AutoCloseable {
  private final Context.CancellableContext context;
  private final Iterator<StreamChatCompletionResponse> chunks;

  ChatStream(Context.CancellableContext context, Iterator<StreamChatCompletionResponse> chunks) {
    this.context = context;
    this.chunks = chunks;
  }

  @Override
  public boolean hasNext() {
    try {
      boolean more = chunks.hasNext();
      if (!more) {
        context.cancel(null);
      }
      return more;
    } catch (RuntimeException error) {
      context.cancel(null);
      throw MarieException.from(error);
    }
  }

  @Override
  public StreamChatCompletionResponse next() {
    if (!hasNext()) {
      throw new NoSuchElementException();
    }
    return chunks.next();
  }

  @Override
  public Iterator<StreamChatCompletionResponse> iterator() {
    return this;
  }

  /** Cancel the call if it is still running. */
  @Override
  public void close() {
    context.cancel(null);
  }

  /** Read the stream to its end and assemble the reply. */
  public ChatResult collect() {
    try (this) {
      StringBuilder content = new StringBuilder();
      ChatResult.Builder result = new ChatResult.Builder();
      while (hasNext()) {
        StreamChatCompletionResponse chunk = next();
        result.first(chunk);
        content.append(chunk.getContent());
        chunk.getToolCallsList().forEach(result::toolCall);
        if (chunk.getFinishReason() != FinishReason.FINISH_REASON_UNSPECIFIED) {
          result.finishReason = chunk.getFinishReason();
        }
        if (chunk.hasUsage()) {
          result.usage = chunk.getUsage();
        }
      }
      return result.build(content.toString());
    }
  }
}
