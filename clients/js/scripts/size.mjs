// The browser bundle's size (scripts/bundle.mjs: minified, `ws` left out), then gzipped.
// Prints bytes; the goal is under 10 KB.
import { gzipSync } from "node:zlib";

import { browserBundle } from "./bundle.mjs";

const code = await browserBundle();
console.log(`switchboard-client browser bundle: ${code.length} bytes minified, ${gzipSync(code).length} bytes min+gzip`);
