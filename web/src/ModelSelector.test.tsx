import { MantineProvider } from "@mantine/core";
import { render, screen, within } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { describe, expect, it, vi } from "vitest";
import type { Api, Model, ModelsByProvider } from "./api";
import { ModelSelector } from "./ModelSelector";
import { groupModels } from "./models";

function model(provider: string, name: string, extra: Partial<Model> = {}): Model {
  return {
    id: name,
    name,
    provider,
    full_id: `${provider}/${name}`,
    description: null,
    parameters: null,
    quantization: null,
    size: null,
    size_bytes: null,
    context_length: null,
    max_tokens: null,
    capabilities: ["chat"],
    metadata: {},
    ...extra,
  };
}

const LISTING: ModelsByProvider = {
  models: {
    ollama: [
      model("ollama", "qwen2.5:0.5b", { parameters: "494M", metadata: { family: "qwen2" } }),
      model("ollama", "llama3.2:latest", {
        parameters: "3.2B",
        quantization: "Q4_K_M",
        size_bytes: 2_019_393_189,
        context_length: 131072,
        capabilities: ["chat", "tools"],
        metadata: { family: "llama" },
      }),
    ],
    huggingface: [model("huggingface", "mistral-7b", { description: "A llama-free model" })],
  },
  total: 3,
  errors: [],
};

describe("groupModels", () => {
  it("groups by provider, sorted, and filters on every word", () => {
    expect(groupModels(LISTING, "").map((g) => [g.provider, g.models.map((m) => m.name)])).toEqual([
      ["huggingface", ["mistral-7b"]],
      ["ollama", ["llama3.2:latest", "qwen2.5:0.5b"]],
    ]);
    // Family and description count; a provider with no match disappears.
    expect(groupModels(LISTING, "qwen2").map((g) => g.provider)).toEqual(["ollama"]);
    expect(groupModels(LISTING, "LLAMA3").flatMap((g) => g.models.map((m) => m.name))).toEqual([
      "llama3.2:latest",
    ]);
    expect(groupModels(LISTING, "free").flatMap((g) => g.models.map((m) => m.name))).toEqual([
      "mistral-7b",
    ]);
    expect(groupModels(LISTING, "llama tools").flatMap((g) => g.models.map((m) => m.name))).toEqual([
      "llama3.2:latest",
    ]);
    expect(groupModels(LISTING, "nothing-like-this")).toEqual([]);
  });
});

describe("ModelSelector", () => {
  it("shows providers' health, searches, and shows the chosen model's details", async () => {
    const get = vi.fn(async (path: string) => {
      if (path.startsWith("/api/models/providers/health"))
        return {
          ollama: { status: "healthy", available: true, models_count: 2, latency_ms: 1, error: null, default_model: null },
          huggingface: { status: "error", available: false, models_count: 0, latency_ms: null, error: "down", default_model: null },
          local: {
            status: "degraded",
            available: true,
            models_count: 1,
            latency_ms: 2,
            error: "local/m (embeddings) circuit open",
            default_model: null,
            deployments: [
              { model: "local/m", operation: "chat", circuit: "closed", retry_at: null, consecutive_failures: 0,
                in_flight: 0, max_concurrency: 0, background_in_flight: 0, max_background_concurrency: 1 },
              { model: "local/m", operation: "embeddings", circuit: "open", retry_at: "2026-01-01T10:00:00Z",
                consecutive_failures: 5, in_flight: 0, max_concurrency: 0, background_in_flight: 0,
                max_background_concurrency: 1 },
            ],
          },
        };
      if (path === "/api/models/ollama/llama3.2%3Alatest")
        return { ...LISTING.models.ollama?.[1], description: "Meta's small model" };
      return LISTING;
    });
    const api = { get } as unknown as Api;
    const onSelect = vi.fn();
    const view = render(
      <MantineProvider>
        <ModelSelector api={api} selected="ollama/llama3.2:latest" onSelect={onSelect} />
      </MantineProvider>,
    );
    expect(await screen.findByText("ollama: healthy")).toBeInTheDocument();
    expect(screen.getByText("huggingface: error")).toBeInTheDocument();
    // A degraded provider says which model and operation it refuses, and until when.
    expect(screen.getByText("local: degraded")).toBeInTheDocument();
    const refusing = screen.getByRole("alert", { name: /local is refusing some requests/ });
    expect(refusing).toHaveTextContent(/local\/m \(embeddings\): open until .*, after 5 failures/);
    expect(refusing).not.toHaveTextContent("(chat)");
    const list = screen.getByRole("listbox", { name: "Models" });
    expect(within(list).getAllByRole("option")).toHaveLength(3);
    // Details of the selected model: context length, family, badges.
    const details = screen.getByTestId("model-details");
    expect(details).toHaveTextContent("131,072");
    expect(details).toHaveTextContent("llama");
    expect(details).toHaveTextContent("Q4_K_M");
    expect(details).toHaveTextContent("2.0 GB");
    // The model's own answer fills in the details.
    expect(await within(details).findByText("Meta's small model")).toBeInTheDocument();

    await userEvent.type(screen.getByLabelText("Search models"), "qwen");
    const options = within(list).getAllByRole("option");
    expect(options).toHaveLength(1);
    const [qwen] = options;
    if (qwen === undefined) throw new Error("no option");
    await userEvent.click(qwen);
    expect(onSelect).toHaveBeenCalledWith(expect.objectContaining({ full_id: "ollama/qwen2.5:0.5b" }));

    await userEvent.click(screen.getByRole("button", { name: "Refresh" }));
    expect(get).toHaveBeenCalledWith("/api/models?refresh=true");
    view.unmount();
  });
});
