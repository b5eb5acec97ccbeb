// Package marie is a Go gRPC client for Marie's ProviderService: models,
// streaming chat, embeddings. The API key travels as
// "authorization: Bearer …" on every call, so the same client works
// directly against the providers service and through Envoy.
//
// The generated messages and stubs are in the gen/marie/... packages
// (providersv1, authv1, memoryv1).
package marie

import (
	"context"
	"errors"
	"io"
	"iter"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	authv1 "github.com/marie/marie/clients/go/gen/marie/auth/v1"
	memoryv1 "github.com/marie/marie/clients/go/gen/marie/memory/v1"
	providersv1 "github.com/marie/marie/clients/go/gen/marie/providers/v1"
)

// Default deadlines, for calls whose context has none: DefaultTimeout for
// lookups, DefaultStreamTimeout for streams and for the unary calls that wait
// for a model: CreateChatCompletion, CreateEmbeddings and AddMemories.
const (
	DefaultTimeout       = 10 * time.Second
	DefaultStreamTimeout = 600 * time.Second
)

// modelCalls are the unary methods that wait for a model's output, and so
// get the stream timeout by default: a lookup's 10 s would cut them off.
var modelCalls = map[string]bool{
	providersv1.ProviderService_CreateChatCompletion_FullMethodName: true,
	providersv1.ProviderService_CreateEmbeddings_FullMethodName:     true,
	memoryv1.MemoryService_AddMemories_FullMethodName:               true,
}

// Client is safe for concurrent use; make one and reuse it (one connection).
type Client struct {
	conn          *grpc.ClientConn
	timeout       time.Duration
	streamTimeout time.Duration
	// Providers is the generated stub, for anything the helpers do not
	// cover; the key and the default deadlines apply to it as well.
	Providers providersv1.ProviderServiceClient
	// Auth and Memory are the generated stubs of AuthService and
	// MemoryService on the same connection, key and default deadlines
	// included: for a Client of Envoy (one address for every routed
	// service) or of that service's own address. Errors: marie.FromError.
	Auth   authv1.AuthServiceClient
	Memory memoryv1.MemoryServiceClient
}

type settings struct {
	creds         credentials.TransportCredentials
	timeout       time.Duration
	streamTimeout time.Duration
	dialOptions   []grpc.DialOption
}

// Option configures New.
type Option func(*settings)

// WithTLS uses TLS with the given credentials (default: plaintext).
func WithTLS(creds credentials.TransportCredentials) Option {
	return func(s *settings) { s.creds = creds }
}

// WithTimeout sets the deadline of lookups (unary calls that do not wait for a
// model) whose context has none.
func WithTimeout(d time.Duration) Option { return func(s *settings) { s.timeout = d } }

// WithStreamTimeout sets the deadline of streams, CreateChatCompletion,
// CreateEmbeddings and AddMemories whose context has none.
func WithStreamTimeout(d time.Duration) Option {
	return func(s *settings) { s.streamTimeout = d }
}

// WithDialOptions passes extra options to grpc.NewClient.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(s *settings) { s.dialOptions = append(s.dialOptions, opts...) }
}

type bearer struct {
	header string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": b.header}, nil
}

func (b bearer) RequireTransportSecurity() bool { return b.secure }

// New connects (lazily) to address ("host:port") with apiKey.
func New(address, apiKey string, opts ...Option) (*Client, error) {
	if strings.TrimSpace(apiKey) == "" {
		return nil, errors.New("marie: apiKey is required")
	}
	s := settings{timeout: DefaultTimeout, streamTimeout: DefaultStreamTimeout}
	for _, opt := range opts {
		opt(&s)
	}
	secure := s.creds != nil
	if !secure {
		s.creds = insecure.NewCredentials()
	}
	c := &Client{timeout: s.timeout, streamTimeout: s.streamTimeout}
	dial := append([]grpc.DialOption{
		grpc.WithTransportCredentials(s.creds),
		grpc.WithPerRPCCredentials(bearer{header: "Bearer " + apiKey, secure: secure}),
		grpc.WithUnaryInterceptor(c.unaryDeadline),
		grpc.WithStreamInterceptor(c.streamDeadline),
	}, s.dialOptions...)
	conn, err := grpc.NewClient(address, dial...)
	if err != nil {
		return nil, err
	}
	c.conn = conn
	c.Providers = providersv1.NewProviderServiceClient(conn)
	c.Auth = authv1.NewAuthServiceClient(conn)
	c.Memory = memoryv1.NewMemoryServiceClient(conn)
	return c, nil
}

// Close closes the connection; calls in flight fail with Canceled.
func (c *Client) Close() error { return c.conn.Close() }

func (c *Client) unaryDeadline(ctx context.Context, method string, req, reply any,
	cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if _, ok := ctx.Deadline(); !ok {
		timeout := c.timeout
		if modelCalls[method] {
			timeout = c.streamTimeout
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

func (c *Client) streamDeadline(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
	method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	if _, ok := ctx.Deadline(); ok {
		return streamer(ctx, desc, cc, method, opts...)
	}
	ctx, cancel := context.WithTimeout(ctx, c.streamTimeout)
	stream, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		cancel()
		return nil, err
	}
	return &cancelOnEnd{ClientStream: stream, cancel: cancel}, nil
}

// cancelOnEnd releases the stream's deadline timer once the stream ends.
type cancelOnEnd struct {
	grpc.ClientStream
	cancel context.CancelFunc
}

func (s *cancelOnEnd) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err != nil {
		s.cancel()
	}
	return err
}

// ListModels lists every model (and the providers that failed to list).
func (c *Client) ListModels(ctx context.Context, req *providersv1.ListModelsRequest) (*providersv1.ListModelsResponse, error) {
	if req == nil {
		req = &providersv1.ListModelsRequest{}
	}
	resp, err := c.Providers.ListModels(ctx, req)
	return resp, asError(err)
}

// GetModel gives one model's details; model is "provider/name" or a bare name.
func (c *Client) GetModel(ctx context.Context, model string) (*providersv1.ModelInfo, error) {
	resp, err := c.Providers.GetModel(ctx, &providersv1.GetModelRequest{Model: model})
	if err != nil {
		return nil, asError(err)
	}
	return resp.GetModel(), nil
}

// SearchModels finds models by name, family or description.
func (c *Client) SearchModels(ctx context.Context, req *providersv1.SearchModelsRequest) ([]*providersv1.ModelInfo, error) {
	resp, err := c.Providers.SearchModels(ctx, req)
	if err != nil {
		return nil, asError(err)
	}
	return resp.GetModels(), nil
}

// ListProviders lists the configured providers.
func (c *Client) ListProviders(ctx context.Context) ([]*providersv1.Provider, error) {
	resp, err := c.Providers.ListProviders(ctx, &providersv1.ListProvidersRequest{})
	if err != nil {
		return nil, asError(err)
	}
	return resp.GetProviders(), nil
}

// CreateEmbeddings embeds inputs with an embedding model.
func (c *Client) CreateEmbeddings(ctx context.Context, req *providersv1.CreateEmbeddingsRequest) (*providersv1.CreateEmbeddingsResponse, error) {
	resp, err := c.Providers.CreateEmbeddings(ctx, req)
	return resp, asError(err)
}

// UserMessage is a convenience for a user turn.
func UserMessage(content string) *providersv1.ChatMessage {
	return &providersv1.ChatMessage{Role: providersv1.Role_ROLE_USER, Content: content}
}

// ChatStream is one StreamChatCompletion call. Read it with Recv until
// io.EOF, or range over Chunks. Close (or cancelling the context given to
// StreamChat) cancels the call on the server, which stops the model upstream.
type ChatStream struct {
	stream grpc.ServerStreamingClient[providersv1.StreamChatCompletionResponse]
	cancel context.CancelFunc
}

// StreamChat starts a chat completion.
func (c *Client) StreamChat(ctx context.Context, req *providersv1.StreamChatCompletionRequest) (*ChatStream, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := c.Providers.StreamChatCompletion(ctx, req)
	if err != nil {
		cancel()
		return nil, asError(err)
	}
	return &ChatStream{stream: stream, cancel: cancel}, nil
}

// Recv returns the next chunk, io.EOF at the end, or an *Error.
func (s *ChatStream) Recv() (*providersv1.StreamChatCompletionResponse, error) {
	chunk, err := s.stream.Recv()
	if err == io.EOF {
		s.cancel()
		return nil, io.EOF
	}
	if err != nil {
		s.cancel()
		return nil, asError(err)
	}
	return chunk, nil
}

// Chunks ranges over the stream: for chunk, err := range stream.Chunks().
// Breaking out of the loop cancels the call.
func (s *ChatStream) Chunks() iter.Seq2[*providersv1.StreamChatCompletionResponse, error] {
	return func(yield func(*providersv1.StreamChatCompletionResponse, error) bool) {
		defer s.Close()
		for {
			chunk, err := s.Recv()
			if err == io.EOF {
				return
			}
			if !yield(chunk, err) || err != nil {
				return
			}
		}
	}
}

// Close cancels the call if it is still running.
func (s *ChatStream) Close() { s.cancel() }

// ChatResult is a whole reply assembled from its chunks.
type ChatResult struct {
	ID, Model, Provider, Content string
	FinishReason                 providersv1.FinishReason
	Usage                        *providersv1.Usage
	ToolCalls                    map[int32]*providersv1.ToolCallDelta
}

// Collect reads the stream to its end and assembles the reply.
func (s *ChatStream) Collect() (*ChatResult, error) {
	result := &ChatResult{ToolCalls: map[int32]*providersv1.ToolCallDelta{}}
	var content strings.Builder
	for chunk, err := range s.Chunks() {
		if err != nil {
			return nil, err
		}
		if result.ID == "" {
			result.ID, result.Model, result.Provider = chunk.GetId(), chunk.GetModel(), chunk.GetProvider()
		}
		content.WriteString(chunk.GetContent())
		for _, delta := range chunk.GetToolCalls() {
			known, ok := result.ToolCalls[delta.GetIndex()]
			if !ok {
				known = &providersv1.ToolCallDelta{Index: delta.GetIndex()}
				result.ToolCalls[delta.GetIndex()] = known
			}
			if known.Id == "" {
				known.Id = delta.GetId()
			}
			if known.Type == "" {
				known.Type = delta.GetType()
			}
			if known.Name == "" {
				known.Name = delta.GetName()
			}
			known.Arguments += delta.GetArguments()
		}
		if chunk.GetFinishReason() != providersv1.FinishReason_FINISH_REASON_UNSPECIFIED {
			result.FinishReason = chunk.GetFinishReason()
		}
		if chunk.GetUsage() != nil {
			result.Usage = chunk.GetUsage()
		}
	}
	result.Content = content.String()
	return result, nil
}
