import type { DeploymentState, Model, ModelsByProvider } from "./api";

export interface ProviderGroup {
  provider: string;
  models: Model[];
}

/** Does `model` match every word of `search` (in its name, provider, family, description, badges)? */
export function matches(model: Model, search: string): boolean {
  const words = search.toLowerCase().split(/\s+/).filter(Boolean);
  if (words.length === 0) return true;
  const family = typeof model.metadata.family === "string" ? model.metadata.family : "";
  const haystack = [
    model.full_id,
    model.provider,
    family,
    model.description ?? "",
    model.parameters ?? "",
    model.quantization ?? "",
    ...model.capabilities,
  ]
    .join(" ")
    .toLowerCase();
  return words.every((w) => haystack.includes(w));
}

/** Models grouped by provider (providers and models sorted by name), filtered by `search`. */
export function groupModels(listing: ModelsByProvider, search: string): ProviderGroup[] {
  return Object.keys(listing.models)
    .sort()
    .map((provider) => ({
      provider,
      models: (listing.models[provider] ?? [])
        .filter((m) => matches(m, search))
        .sort((a, b) => a.name.localeCompare(b.name)),
    }))
    .filter((g) => g.models.length > 0);
}

export const HEALTH_COLOURS: Record<string, string> = {
  healthy: "green",
  degraded: "yellow",
  unhealthy: "orange",
  error: "red",
  unknown: "gray",
};

/** What a provider's refusing circuits say, one line each: "local/m (chat): open until 10:02:03". */
export function refusals(deployments: DeploymentState[] | undefined): string[] {
  return (deployments ?? [])
    .filter((d) => d.circuit !== "closed")
    .map((d) => {
      const state = d.circuit === "half_open" ? "being probed" : "open";
      const until = d.retry_at ? ` until ${new Date(d.retry_at).toLocaleTimeString()}` : "";
      return `${d.model} (${d.operation}): ${state}${until}, after ${d.consecutive_failures} failures`;
    });
}

export function formatBytes(bytes: number | null): string | null {
  if (!bytes) return null;
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(value >= 10 || unit === 0 ? 0 : 1)} ${units[unit]}`;
}
