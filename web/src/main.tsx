import "@mantine/core/styles.css";
import "@mantine/charts/styles.css";
import "./app.css";
import { createTheme, MantineProvider } from "@mantine/core";
import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { App } from "./App";

// The default theme: its variables (system fonts, nothing fetched) are in the stylesheet.
const theme = createTheme({ focusRing: "always" });

const root = document.getElementById("root");
if (root === null) throw new Error("no #root element");
createRoot(root).render(
  <StrictMode>
    {/* CSS variables come from the stylesheet, not an injected <style>: the CSP allows only 'self'. */}
    <MantineProvider theme={theme} defaultColorScheme="auto" withCssVariables={false}>
      <App />
    </MantineProvider>
  </StrictMode>,
);
