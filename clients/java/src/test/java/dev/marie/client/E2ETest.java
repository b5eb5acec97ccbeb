package dev.marie.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import dev.marie.auth.v1.ListApiKeysRequest;
import dev.marie.memory.v1.AddMemoriesRequest;
import dev.marie.memory.v1.ListConversationsRequest;
import dev.marie.memory.v1.ListConversationsResponse;
import dev.marie.providers.v1.CreateChatCompletionRequest;
import dev.marie.providers.v1.CreateEmbeddingsRequest;
import dev.marie.providers.v1.FinishReason;
import dev.marie.providers.v1.ListModelsRequest;
import dev.marie.providers.v1.ModelInfo;
import dev.marie.providers.v1.ProviderServiceGrpc;
import dev.marie.providers.v1.SamplingParameters;
import dev.marie.providers.v1.StreamChatCompletionRequest;
import dev.marie.providers.v1.StreamChatCompletionResponse;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.util.List;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;

/**
 * End-to-end check of the Java client against a running Marie, run by tests/test_clients.py (which
 * starts the suite with a fake Ollama and sets the environment read here). Prints one "ok <check>
 * <detail>" line per check.
 */
class E2ETest {
  private static final HttpClient HTTP = HttpClient.newHttpClient();

  private static String env(String name) {
    return System.getenv(name);
  }

  private static String probe(String path) throws Exception {
    HttpRequest request = HttpRequest.newBuilder(URI.create(env("MARIE_PROBE_URL") + path)).build();
    return HTTP.send(request, HttpResponse.BodyHandlers.ofString()).body();
  }

  @Test
  void againstTheRunningSuite() throws Exception {
    assumeTrue(env("MARIE_ADDRESS") != null,
        "MARIE_ADDRESS not set: run through tests/test_clients.py, which starts the suite");
    String chatModel = env("MARIE_CHAT_MODEL");
    try (MarieClient marie = MarieClient.builder(env("MARIE_ADDRESS"), env("MARIE_API_KEY")).build()) {
      List<String> ids = marie.listModels().getModelsList().stream().map(ModelInfo::getId).toList();
      assertTrue(ids.contains(chatModel), ids.toString());
      System.out.println("ok list_models " + ids.size());

      ModelInfo model = marie.getModel(chatModel);
      assertEquals(chatModel, model.getId());
      assertTrue(model.getContextLength() > 0);
      System.out.println("ok get_model " + model.getId() + " " + model.getContextLength());

      StreamChatCompletionRequest request = StreamChatCompletionRequest.newBuilder()
          .setModel(chatModel)
          .addMessages(MarieClient.user(env("MARIE_PROMPT")))
          .build();
      StringBuilder text = new StringBuilder();
      int chunks = 0;
      try (ChatStream stream = marie.streamChat(request)) {
        for (StreamChatCompletionResponse chunk : stream) {
          chunks++;
          text.append(chunk.getContent());
        }
      }
      assertEquals(env("MARIE_EXPECTED_REPLY"), text.toString());
      assertTrue(chunks > 1);
      System.out.println("ok stream_chat " + chunks + " " + text);

      ChatResult result = marie.streamChat(request).collect();
      assertEquals(env("MARIE_EXPECTED_REPLY"), result.content());
      assertEquals(FinishReason.FINISH_REASON_STOP, result.finishReason());
      assertTrue(result.usage().getTotalTokens() > 0);
      System.out.println("ok collect");

      int before = Integer.parseInt(probe("/disconnects"));
      int seen = 0;
      try (ChatStream stream = marie.streamChat(StreamChatCompletionRequest.newBuilder()
          .setModel(env("MARIE_ENDLESS_MODEL"))
          .addMessages(MarieClient.user("go on forever"))
          .build())) {
        while (stream.hasNext() && seen < 3) {
          stream.next();
          seen++;
        }
      } // closing cancels the call
      assertEquals("ok", probe("/wait-disconnect?count=" + (before + 1)));
      marie.getModel(chatModel); // the channel is still good
      System.out.println("ok cancel " + seen);

      StreamChatCompletionRequest bad = request.toBuilder()
          .setSampling(SamplingParameters.newBuilder().setTemperature(5))
          .build();
      MarieException invalid = assertThrows(MarieException.class, () -> {
        try (ChatStream stream = marie.streamChat(bad)) {
          stream.forEachRemaining(chunk -> { });
        }
      });
      assertEquals(Status.Code.INVALID_ARGUMENT, invalid.code());
      assertEquals("INVALID_ARGUMENT", invalid.reason());
      assertEquals("sampling.temperature", invalid.field());
      System.out.println("ok invalid_argument " + invalid.field() + " " + invalid.domain());

      MarieException missing =
          assertThrows(MarieException.class, () -> marie.getModel("ollama/no-such-model:latest"));
      assertEquals(Status.Code.NOT_FOUND, missing.code());
      System.out.println("ok not_found " + missing.reason());
    }
    // A server that records what arrives: the key must be on the wire.
    try (MarieClient recorded =
        MarieClient.builder(env("MARIE_RECORDER_ADDRESS"), env("MARIE_API_KEY")).build()) {
      MarieException unimplemented = assertThrows(MarieException.class, recorded::listModels);
      assertEquals(Status.Code.UNIMPLEMENTED, unimplemented.code());
      // Calls that wait for a model get the long default deadline (the recorder checks what
      // arrived): the helper, and the generated stubs on the client's channel.
      MarieException embeddings = assertThrows(MarieException.class,
          () -> recorded.createEmbeddings(CreateEmbeddingsRequest.newBuilder()
              .setModel("ollama/nomic-embed-text:latest").addInputs("hi").build()));
      assertEquals(Status.Code.UNIMPLEMENTED, embeddings.code());
      StatusRuntimeException chat = assertThrows(StatusRuntimeException.class,
          () -> ProviderServiceGrpc.newBlockingStub(recorded.channel())
              .createChatCompletion(CreateChatCompletionRequest.getDefaultInstance()));
      assertEquals(Status.Code.UNIMPLEMENTED, chat.getStatus().getCode());
      StatusRuntimeException memories = assertThrows(StatusRuntimeException.class,
          () -> recorded.memory().addMemories(AddMemoriesRequest.getDefaultInstance()));
      assertEquals(Status.Code.UNIMPLEMENTED, memories.getStatus().getCode());
      System.out.println("ok bearer");
    }
    // Through Envoy, which lets a call pass only with a key the gateway accepts.
    String envoy = env("MARIE_ENVOY_ADDRESS");
    try (MarieClient edge = MarieClient.builder(envoy, env("MARIE_API_KEY")).build()) {
      List<ModelInfo> models = edge.listModels().getModelsList();
      assertTrue(models.stream().anyMatch(m -> m.getId().equals(chatModel)), models.toString());
      System.out.println("ok envoy_models " + models.size());
      // AuthService through Envoy with the key: it needs the admin scope, which this key lacks
      // (a call without the key would be UNAUTHENTICATED).
      MarieException denied = assertThrows(MarieException.class, () -> {
        try {
          edge.auth().listApiKeys(ListApiKeysRequest.getDefaultInstance());
        } catch (RuntimeException error) {
          throw MarieException.from(error);
        }
      });
      assertEquals(Status.Code.PERMISSION_DENIED, denied.code());
      System.out.println("ok auth_stub " + denied.code());
    }
    // MemoryService at its own address.
    try (MarieClient memory =
        MarieClient.builder(env("MARIE_MEMORY_ADDRESS"), env("MARIE_API_KEY")).build()) {
      ListConversationsResponse listed = memory.memory().listConversations(
          ListConversationsRequest.newBuilder().setUserId(env("MARIE_MEMORY_USER")).build());
      assertEquals(0, listed.getConversationsCount());
      System.out.println("ok memory_stub " + listed.getConversationsCount());
    }
    // The generated stub on a channel without the key: no key at all.
    ManagedChannel bare = Grpc.newChannelBuilder(envoy, InsecureChannelCredentials.create()).build();
    try {
      MarieException refused = assertThrows(MarieException.class, () -> {
        try {
          ProviderServiceGrpc.newBlockingStub(bare).withDeadlineAfter(10, TimeUnit.SECONDS)
              .listModels(ListModelsRequest.getDefaultInstance());
        } catch (RuntimeException error) {
          throw MarieException.from(error);
        }
      });
      assertEquals(Status.Code.UNAUTHENTICATED, refused.code());
      // Envoy passes on the gateway's refusal with its ErrorInfo.
      assertEquals("INVALID_API_KEY", refused.reason());
      assertEquals("marie", refused.domain());
      assertTrue(refused.getMessage().contains("You didn't provide an API key"),
          refused.getMessage());
      System.out.println("ok unauthenticated " + refused.code() + " " + refused.reason() + " "
          + refused.getMessage());
    } finally {
      bare.shutdownNow();
    }
  }
}
