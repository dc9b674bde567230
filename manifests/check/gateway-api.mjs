// Validates Gateway API objects with the models of @kubernetes-models/gateway-api, which
// carry the Gateway API's types, enums, patterns and bounds (not its unknown-field pruning).
// Run by validate.py: `node gateway-api.mjs <node_modules dir>`, a JSON array of objects on
// stdin; prints a JSON array with {errors: [...]} for each object, in order.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const root = process.argv[2];
const objects = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const obj of objects) {
  const [group, version] = obj.apiVersion.split("/");
  const file = join(root, "@kubernetes-models/gateway-api", group, version, `${obj.kind}.js`);
  let model;
  try {
    model = (await import(pathToFileURL(file).href))[obj.kind];
  } catch (e) {
    results.push({ errors: [`no model for ${obj.apiVersion} ${obj.kind} (${file})`] });
    continue;
  }
  try {
    new model(obj).validate();
    results.push({ errors: [] });
  } catch (e) {
    results.push({ errors: String(e.message).split(", ").map((m) => m.replace(/^data\//, "").replaceAll("/", ".")) });
  }
}
process.stdout.write(JSON.stringify(results));
