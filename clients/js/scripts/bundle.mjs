// The SDK as one browser module (src/index.ts bundled, `ws` left out: browsers have
// WebSocket), minified. The gateway serves it beside its demo page
// (broker/src/management/switchboard-client.js, embedded in the binary, so building the
// gateway needs no Node). `npm run bundle` writes it; `--check` fails when the file there is
// not this build (the SDK's tests run that, so the two cannot drift).
import { build } from "esbuild";
import { readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
const target = fileURLToPath(new URL("../../../broker/src/management/switchboard-client.js", import.meta.url));
const { version } = JSON.parse(readFileSync(`${root}/package.json`, "utf8"));

/** The minified browser bundle, as bytes. */
export async function browserBundle() {
  const result = await build({
    entryPoints: [`${root}/src/index.ts`],
    bundle: true,
    minify: true,
    format: "esm",
    platform: "browser",
    target: "es2022",
    external: ["ws"],
    banner: { js: `// switchboard-client ${version}, built from clients/js by \`npm run bundle\`: do not edit.` },
    write: false,
  });
  return result.outputFiles[0].contents;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const code = await browserBundle();
  if (process.argv.includes("--check")) {
    let committed = "";
    try {
      committed = readFileSync(target, "utf8");
    } catch {}
    if (committed !== Buffer.from(code).toString("utf8")) {
      console.error(`${target} is not the build of clients/js/src: run \`npm run bundle\` and commit it`);
      process.exit(1);
    }
  } else {
    writeFileSync(target, code);
    console.log(`wrote ${target} (${code.length} bytes)`);
  }
}
