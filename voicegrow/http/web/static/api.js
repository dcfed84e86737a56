// The JSON API as the pages use it: the admin token lives in sessionStorage (this tab only, gone when
// it closes), travels as a Bearer header on every call, and never appears in a URL.

const TOKEN_KEY = "voicegrow.admin_token";

export class AuthError extends Error {}

export class ApiError extends Error {
  constructor(status, error, reason) {
    super(reason || error || `HTTP ${status}`);
    this.status = status;
    this.error = error;
  }
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export function authHeaders() {
  const token = getToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** fetch() with the token; JSON in and out; 401 becomes AuthError, other errors ApiError. */
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin", cache: "no-store",
  });
  if (response.status === 401) throw new AuthError("unauthorized");
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, data.error, data.reason);
  return data;
}

/** An audio object as a blob: URL (same-origin recordings need the token; presigned URLs do not). */
export async function audioUrl(url) {
  const target = new URL(url, location.href);
  if (target.origin !== location.origin) return target.href;
  const response = await fetch(target.pathname + target.search, { headers: authHeaders(), cache: "no-store" });
  if (response.status === 401) throw new AuthError("unauthorized");
  if (!response.ok) throw new ApiError(response.status, "audio", `HTTP ${response.status}`);
  return URL.createObjectURL(await response.blob());
}

/** Whether the server asks for a token, and whether the one we hold is accepted. */
export async function checkSignIn() {
  const config = await api("/api/v1/web/config");
  try {
    await api("/api/v1/sessions");
    return { config, signedIn: true };
  } catch (exc) {
    if (exc instanceof AuthError) return { config, signedIn: false };
    throw exc;
  }
}

/** Wires a sign-in form (an input[name=token]); onSignedIn runs once the server accepted the token. */
export function setupSignIn(form, { onSignedIn, onRefused }) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = form.elements.namedItem("token");
    setToken(input.value.trim());
    input.value = "";
    try {
      await api("/api/v1/sessions");
      onSignedIn();
    } catch (exc) {
      setToken("");
      onRefused(exc);
    }
  });
}
