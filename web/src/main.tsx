import "@mantine/core/styles.css";
import "@mantine/charts/styles.css";
import "./app.css";
import { createTheme, MantineProvider, Modal } from "@mantine/core";
import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { App } from "./App";

// The default theme: its variables (system fonts, nothing fetched) are in the stylesheet.
// Modals do not lock the page's scroll: the lock (react-remove-scroll) works
// by injecting a <style>, which the CSP refuses.
const theme = createTheme({
  focusRing: "always",
  components: { Modal: Modal.extend({ defaultProps: { lockScroll: false } }) },
});

const root = document.getElementById("root");
if (root === null) throw new Error("no #root element");
createRoot(root).render(
  <StrictMode>
    {/* The CSS variables and the hidden-from/visible-from classes come from
        stylesheets, not injected <style> elements: the CSP allows only 'self'. */}
    <MantineProvider
      theme={theme}
      defaultColorScheme="auto"
      withCssVariables={false}
      withGlobalClasses={false}
    >
      <App />
    </MantineProvider>
  </StrictMode>,
);
