// Validates KEDA objects against the KEDA CRDs' OpenAPI schemas, as compiled
// into JSON Schema validators by @kubernetes-models/keda (pinned in
// package.json). Reads a JSON array of objects on stdin; prints one line per
// object and exits 1 if any is invalid. Run by deploy/tools/check.py.
import * as keda from "@kubernetes-models/keda/keda.sh/v1alpha1";

const chunks = [];
process.stdin.on("data", (c) => chunks.push(c));
process.stdin.on("end", () => {
  const objects = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  let failed = 0;
  for (const obj of objects) {
    const name = `${obj.kind}/${(obj.metadata || {}).name}`;
    const Model = obj.apiVersion === "keda.sh/v1alpha1" ? keda[obj.kind] : undefined;
    if (!Model) {
      console.log(`${name}: no KEDA schema for ${obj.apiVersion} ${obj.kind}`);
      failed++;
      continue;
    }
    try {
      new Model(obj).validate();
      console.log(`${name}: valid (KEDA CRD schema)`);
    } catch (err) {
      console.log(`${name}: INVALID: ${err.message}`);
      failed++;
    }
  }
  process.exit(failed ? 1 : 0);
});
