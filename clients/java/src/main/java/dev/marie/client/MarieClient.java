package dev.marie.client;

import dev.marie.auth.v1.AuthServiceGrpc;
import dev.marie.memory.v1.MemoryServiceGrpc;
import dev.marie.providers.v1.ChatMessage;
import dev.marie.providers.v1.CreateEmbeddingsRequest;
import dev.marie.providers.v1.CreateEmbeddingsResponse;
import dev.marie.providers.v1.GetModelRequest;
import dev.marie.providers.v1.ListModelsRequest;
import dev.marie.providers.v1.ListModelsResponse;
import dev.marie.providers.v1.ListProvidersRequest;
import dev.marie.providers.v1.ModelInfo;
import dev.marie.providers.v1.Provider;
import dev.marie.providers.v1.ProviderServiceGrpc;
import dev.marie.providers.v1.Role;
import dev.marie.providers.v1.StreamChatCompletionRequest;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ChannelCredentials;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.Context;
import io.grpc.ForwardingClientCall;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import java.time.Duration;
import java.util.List;
import java.util.Set;
import java.util.concurrent.TimeUnit;
import java.util.function.Supplier;

/**
 * Marie's ProviderService over gRPC, direct or through Envoy. The API key travels as {@code
 * authorization: Bearer …} on every call. A call without a deadline of its own gets one: lookups
 * {@link #DEFAULT_TIMEOUT}; streams and the unary calls that wait for a model (CreateChatCompletion,
 * CreateEmbeddings, AddMemories) {@link #DEFAULT_STREAM_TIMEOUT}, unless the builder says
 * otherwise. Failed calls throw {@link MarieException}. Thread-safe: make one and reuse it (one connection); close it when done.
 */
public final class MarieClient implements AutoCloseable {
  public static final Duration DEFAULT_TIMEOUT = Duration.ofSeconds(10);
  public static final Duration DEFAULT_STREAM_TIMEOUT = Duration.ofSeconds(600);
  public static final String VERSION = "1.0.0";

  private static final Metadata.Key<String> AUTHORIZATION =
      Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);
  /** Unary calls that wait for a model: a lookup's deadline would cut them off. */
  private static final Set<String> MODEL_CALLS = Set.of(
      ProviderServiceGrpc.getCreateChatCompletionMethod().getFullMethodName(),
      ProviderServiceGrpc.getCreateEmbeddingsMethod().getFullMethodName(),
      MemoryServiceGrpc.getAddMemoriesMethod().getFullMethodName());

  private final ManagedChannel channel;
  private final Duration timeout;
  private final Duration streamTimeout;
  private final ProviderServiceGrpc.ProviderServiceBlockingStub providers;

  private MarieClient(Builder builder) {
    String header = "Bearer " + builder.apiKey;
    ClientInterceptor withKey = new ClientInterceptor() {
      @Override
      public <Q, R> ClientCall<Q, R> interceptCall(
          MethodDescriptor<Q, R> method, CallOptions options, Channel next) {
        return new ForwardingClientCall.SimpleForwardingClientCall<>(next.newCall(method, options)) {
          @Override
          public void start(Listener<R> listener, Metadata headers) {
            headers.put(AUTHORIZATION, header);
            super.start(listener, headers);
          }
        };
      }
    };
    this.timeout = builder.timeout;
    this.streamTimeout = builder.streamTimeout;
    ClientInterceptor withDeadline = new ClientInterceptor() {
      @Override
      public <Q, R> ClientCall<Q, R> interceptCall(
          MethodDescriptor<Q, R> method, CallOptions options, Channel next) {
        if (options.getDeadline() == null) {
          boolean waitsForModel = method.getType() != MethodDescriptor.MethodType.UNARY
              || MODEL_CALLS.contains(method.getFullMethodName());
          Duration after = waitsForModel ? streamTimeout : timeout;
          options = options.withDeadlineAfter(after.toMillis(), TimeUnit.MILLISECONDS);
        }
        return next.newCall(method, options);
      }
    };
    this.channel = Grpc.newChannelBuilder(builder.address, builder.credentials)
        .intercept(withKey, withDeadline)
        .build();
    this.providers = ProviderServiceGrpc.newBlockingStub(channel);
  }

  /** A builder for a client of {@code address} ("host:port") with {@code apiKey}. */
  public static Builder builder(String address, String apiKey) {
    return new Builder(address, apiKey);
  }

  /** The channel, for the generated stubs (the key and the default deadlines apply). */
  public Channel channel() {
    return channel;
  }

  /**
   * AuthService's generated stub on this channel, with the key and the default deadlines: for a
   * client of Envoy (one address for every routed service) or of auth's own address. Decode its
   * failures with {@link MarieException#from}.
   */
  public AuthServiceGrpc.AuthServiceBlockingStub auth() {
    return AuthServiceGrpc.newBlockingStub(channel);
  }

  /** MemoryService's generated stub on this channel, as {@link #auth()}. */
  public MemoryServiceGrpc.MemoryServiceBlockingStub memory() {
    return MemoryServiceGrpc.newBlockingStub(channel);
  }

  private static <T> T call(Supplier<T> body) {
    try {
      return body.get();
    } catch (StatusRuntimeException error) {
      throw MarieException.from(error);
    }
  }

  public List<Provider> listProviders() {
    return call(() -> providers.listProviders(ListProvidersRequest.getDefaultInstance()))
        .getProvidersList();
  }

  /** Every model ({@code getModelsList}) and the providers that failed to list. */
  public ListModelsResponse listModels(ListModelsRequest request) {
    return call(() -> providers.listModels(request));
  }

  public ListModelsResponse listModels() {
    return listModels(ListModelsRequest.getDefaultInstance());
  }

  /** One model's details; {@code model} is "provider/name" or a bare name. */
  public ModelInfo getModel(String model) {
    return call(() -> providers.getModel(GetModelRequest.newBuilder().setModel(model).build()))
        .getModel();
  }

  public CreateEmbeddingsResponse createEmbeddings(CreateEmbeddingsRequest request) {
    return call(() -> providers.createEmbeddings(request));
  }

  /**
   * Start a chat completion. Iterate the returned stream (use try-with-resources: closing it early
   * cancels the call on the server, which stops the model upstream).
   */
  public ChatStream streamChat(StreamChatCompletionRequest request) {
    Context.CancellableContext context = Context.current().withCancellation();
    try {
      var chunks = context.call(() -> providers.streamChatCompletion(request));
      return new ChatStream(context, chunks);
    } catch (Exception error) {
      context.cancel(null);
      throw MarieException.from(error);
    }
  }

  /** A user turn, for building requests. */
  public static ChatMessage user(String content) {
    return ChatMessage.newBuilder().setRole(Role.ROLE_USER).setContent(content).build();
  }

  /** Shut the channel down, waiting up to 5 s for calls in flight. */
  @Override
  public void close() throws InterruptedException {
    channel.shutdown();
    if (!channel.awaitTermination(5, TimeUnit.SECONDS)) {
      channel.shutdownNow();
    }
  }

  /** Options for {@link MarieClient}. */
  public static final class Builder {
    private final String address;
    private final String apiKey;
    private ChannelCredentials credentials = InsecureChannelCredentials.create();
    private Duration timeout = DEFAULT_TIMEOUT;
    private Duration streamTimeout = DEFAULT_STREAM_TIMEOUT;

    private Builder(String address, String apiKey) {
      if (apiKey == null || apiKey.isBlank()) {
        throw new IllegalArgumentException("apiKey is required");
      }
      this.address = address;
      this.apiKey = apiKey;
    }

    /** TLS with the system's roots. */
    public Builder tls() {
      return credentials(TlsChannelCredentials.create());
    }

    public Builder credentials(ChannelCredentials credentials) {
      this.credentials = credentials;
      return this;
    }

    public Builder timeout(Duration timeout) {
      this.timeout = timeout;
      return this;
    }

    public Builder streamTimeout(Duration streamTimeout) {
      this.streamTimeout = streamTimeout;
      return this;
    }

    public MarieClient build() {
      return new MarieClient(this);
    }
  }
}
