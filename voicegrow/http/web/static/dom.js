// Tiny DOM helpers: elements are built with properties, never from HTML strings (no injection).

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  for (const child of children) if (child !== "" && child !== null && child !== undefined) node.append(child);
  return node;
}

export function clear(node) {
  node.replaceChildren();
}

/** Unix seconds as local date and time. */
export function formatTime(seconds) {
  if (typeof seconds !== "number") return "—";
  return new Date(seconds * 1000).toLocaleString();
}
