// The feature browser's few behaviours; every page works without them (links and GET forms).
document.addEventListener("DOMContentLoaded", () => {
  // A table row is a link to what its first link points at.
  document.querySelectorAll("tr[data-href]").forEach((row) => {
    row.addEventListener("click", (event) => {
      if (event.target.closest("a") || window.getSelection().toString()) return;
      window.location.href = row.dataset.href;
    });
  });
  // A select marked data-autosubmit submits its form when changed.
  document.querySelectorAll("select[data-autosubmit]").forEach((select) => {
    select.addEventListener("change", () => select.form.submit());
  });
  // Left and right arrow keys follow the page's previous and next links (not while typing).
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || event.target.closest("input, select, textarea")) return;
    const rel = { ArrowLeft: "prev", ArrowRight: "next" }[event.key];
    const link = rel && document.querySelector(`a[rel="${rel}"]`);
    if (link) window.location.href = link.href;
  });
});
