package marie_test

// End-to-end check of the Go client against a running Marie, run by
// tests/test_clients.py (which starts the suite with a fake Ollama and sets
// the environment read below). Prints one "ok <check> <detail>" line per check.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	marie "github.com/marie/marie/clients/go"
	authv1 "github.com/marie/marie/clients/go/gen/marie/auth/v1"
	memoryv1 "github.com/marie/marie/clients/go/gen/marie/memory/v1"
	providersv1 "github.com/marie/marie/clients/go/gen/marie/providers/v1"
)

func probe(t *testing.T, path string) string {
	t.Helper()
	resp, err := http.Get(os.Getenv("MARIE_PROBE_URL") + path)
	if err != nil {
		t.Fatalf("probe %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return string(body)
}

func TestE2E(t *testing.T) {
	address := os.Getenv("MARIE_ADDRESS")
	if address == "" {
		t.Skip("MARIE_ADDRESS not set: run through tests/test_clients.py, which starts the suite")
	}
	chatModel, endless := os.Getenv("MARIE_CHAT_MODEL"), os.Getenv("MARIE_ENDLESS_MODEL")
	client, err := marie.New(address, os.Getenv("MARIE_API_KEY"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx := context.Background()

	list, err := client.ListModels(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, m := range list.GetModels() {
		ids = append(ids, m.GetId())
	}
	if !slices.Contains(ids, chatModel) {
		t.Fatalf("%s not in %v", chatModel, ids)
	}
	fmt.Printf("ok list_models %d\n", len(ids))

	model, err := client.GetModel(ctx, chatModel)
	if err != nil || model.GetId() != chatModel || model.GetContextLength() <= 0 {
		t.Fatalf("GetModel: %v %v", model, err)
	}
	fmt.Printf("ok get_model %s %d\n", model.GetId(), model.GetContextLength())

	request := &providersv1.StreamChatCompletionRequest{
		Model:    chatModel,
		Messages: []*providersv1.ChatMessage{marie.UserMessage(os.Getenv("MARIE_PROMPT"))},
	}
	stream, err := client.StreamChat(ctx, request)
	if err != nil {
		t.Fatal(err)
	}
	var text strings.Builder
	chunks := 0
	for {
		chunk, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		chunks++
		text.WriteString(chunk.GetContent())
	}
	if text.String() != os.Getenv("MARIE_EXPECTED_REPLY") || chunks < 2 {
		t.Fatalf("assembled %q from %d chunks", text.String(), chunks)
	}
	fmt.Printf("ok stream_chat %d %s\n", chunks, text.String())

	stream, err = client.StreamChat(ctx, request)
	if err != nil {
		t.Fatal(err)
	}
	result, err := stream.Collect()
	if err != nil || result.Content != os.Getenv("MARIE_EXPECTED_REPLY") ||
		result.FinishReason != providersv1.FinishReason_FINISH_REASON_STOP ||
		result.Usage.GetTotalTokens() <= 0 {
		t.Fatalf("Collect: %+v %v", result, err)
	}
	fmt.Println("ok collect")

	// Cancel by leaving a range loop, then by cancelling the context.
	before := probe(t, "/disconnects")
	var n int
	fmt.Sscan(before, &n)
	endlessRequest := &providersv1.StreamChatCompletionRequest{
		Model:    endless,
		Messages: []*providersv1.ChatMessage{marie.UserMessage("go on forever")},
	}
	stream, err = client.StreamChat(ctx, endlessRequest)
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for _, err := range stream.Chunks() {
		if err != nil {
			t.Fatal(err)
		}
		seen++
		if seen == 3 {
			break
		}
	}
	if got := probe(t, fmt.Sprintf("/wait-disconnect?count=%d", n+1)); got != "ok" {
		t.Fatalf("upstream did not see the cancel (disconnects %s)", got)
	}
	callCtx, cancel := context.WithCancel(ctx)
	stream, err = client.StreamChat(callCtx, endlessRequest)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	cancel()
	var cancelled *marie.Error
	for {
		_, err := stream.Recv()
		if err != nil {
			if !errors.As(err, &cancelled) || cancelled.Code != codes.Canceled {
				t.Fatalf("after cancel: %v", err)
			}
			break
		}
	}
	if got := probe(t, fmt.Sprintf("/wait-disconnect?count=%d", n+2)); got != "ok" {
		t.Fatalf("upstream did not see the context cancel (disconnects %s)", got)
	}
	if _, err := client.GetModel(ctx, chatModel); err != nil {
		t.Fatalf("connection unusable after a cancel: %v", err)
	}
	fmt.Printf("ok cancel %d\n", seen)

	temperature := float32(5)
	bad := &providersv1.StreamChatCompletionRequest{
		Model:    chatModel,
		Messages: []*providersv1.ChatMessage{marie.UserMessage("hi")},
		Sampling: &providersv1.SamplingParameters{Temperature: &temperature},
	}
	stream, err = client.StreamChat(ctx, bad)
	if err == nil {
		_, err = stream.Recv()
	}
	var invalid *marie.Error
	if !errors.As(err, &invalid) || invalid.Code != codes.InvalidArgument ||
		invalid.Reason != "INVALID_ARGUMENT" || invalid.Field() != "sampling.temperature" {
		t.Fatalf("bad request: %#v", err)
	}
	fmt.Printf("ok invalid_argument %s %s\n", invalid.Field(), invalid.Domain)

	_, err = client.GetModel(ctx, "ollama/no-such-model:latest")
	var missing *marie.Error
	if !errors.As(err, &missing) || missing.Code != codes.NotFound {
		t.Fatalf("unknown model: %v", err)
	}
	fmt.Printf("ok not_found %s\n", missing.Reason)

	// A server that records what arrives: the key must be on the wire.
	recorded, err := marie.New(os.Getenv("MARIE_RECORDER_ADDRESS"), os.Getenv("MARIE_API_KEY"))
	if err != nil {
		t.Fatal(err)
	}
	defer recorded.Close()
	_, err = recorded.ListModels(ctx, nil)
	var unimplemented *marie.Error
	if !errors.As(err, &unimplemented) || unimplemented.Code != codes.Unimplemented {
		t.Fatalf("recorder: %v", err)
	}
	// Calls that wait for a model get the long default deadline (the recorder
	// checks what arrived): the helper, and raw stubs through the interceptor.
	_, err = recorded.CreateEmbeddings(ctx, &providersv1.CreateEmbeddingsRequest{
		Model: "ollama/nomic-embed-text:latest", Inputs: []string{"hi"}})
	if !errors.As(err, &unimplemented) || unimplemented.Code != codes.Unimplemented {
		t.Fatalf("recorder embeddings: %v", err)
	}
	_, err = recorded.Providers.CreateChatCompletion(ctx, &providersv1.CreateChatCompletionRequest{})
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("recorder chat: %v", err)
	}
	_, err = recorded.Memory.AddMemories(ctx, &memoryv1.AddMemoriesRequest{})
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("recorder memories: %v", err)
	}
	fmt.Println("ok bearer")

	// Through Envoy, which lets a call pass only with a key the gateway accepts.
	envoyAddress := os.Getenv("MARIE_ENVOY_ADDRESS")
	edge, err := marie.New(envoyAddress, os.Getenv("MARIE_API_KEY"))
	if err != nil {
		t.Fatal(err)
	}
	defer edge.Close()
	viaEnvoy, err := edge.ListModels(ctx, nil)
	if err != nil {
		t.Fatalf("through Envoy with the key: %v", err)
	}
	fmt.Printf("ok envoy_models %d\n", len(viaEnvoy.GetModels()))

	// The generated stub on a connection without the key: no key at all.
	bare, err := grpc.NewClient(envoyAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer bare.Close()
	timed, cancel := context.WithTimeout(ctx, marie.DefaultTimeout)
	defer cancel()
	_, err = providersv1.NewProviderServiceClient(bare).ListModels(timed, &providersv1.ListModelsRequest{})
	refused := marie.FromError(err)
	if refused == nil || refused.Code != codes.Unauthenticated {
		t.Fatalf("without a key through Envoy: %v", err)
	}
	// Envoy passes on the gateway's refusal with its ErrorInfo.
	if refused.Reason != "INVALID_API_KEY" || refused.Domain != "marie" ||
		!strings.HasPrefix(refused.Message, "You didn't provide an API key") {
		t.Fatalf("without a key through Envoy: %+v", refused)
	}
	fmt.Printf("ok unauthenticated UNAUTHENTICATED %s %s\n", refused.Reason, refused.Message)

	// AuthService through Envoy with the key: it needs the admin scope, which
	// this key lacks (a call without the key would be Unauthenticated).
	_, err = edge.Auth.ListApiKeys(ctx, &authv1.ListApiKeysRequest{})
	if denied := marie.FromError(err); denied == nil || denied.Code != codes.PermissionDenied {
		t.Fatalf("AuthService through Envoy: %v", err)
	}
	fmt.Println("ok auth_stub PERMISSION_DENIED")

	// MemoryService at its own address.
	memory, err := marie.New(os.Getenv("MARIE_MEMORY_ADDRESS"), os.Getenv("MARIE_API_KEY"))
	if err != nil {
		t.Fatal(err)
	}
	defer memory.Close()
	listed, err := memory.Memory.ListConversations(ctx,
		&memoryv1.ListConversationsRequest{UserId: os.Getenv("MARIE_MEMORY_USER")})
	if err != nil || len(listed.GetConversations()) != 0 {
		t.Fatalf("MemoryService: %v %v", listed, err)
	}
	fmt.Printf("ok memory_stub %d\n", len(listed.GetConversations()))
}
