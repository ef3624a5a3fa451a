// The browser bundle's size: src/index.ts bundled for the browser (`ws` left out: browsers
// have WebSocket), minified, then gzipped. Prints bytes; the goal is under 10 KB.
import { build } from "esbuild";
import { gzipSync } from "node:zlib";

const result = await build({
  entryPoints: ["src/index.ts"],
  bundle: true,
  minify: true,
  format: "esm",
  platform: "browser",
  target: "es2022",
  external: ["ws"],
  write: false,
});
const code = result.outputFiles[0].contents;
console.log(`switchboard-client browser bundle: ${code.length} bytes minified, ${gzipSync(code).length} bytes min+gzip`);
