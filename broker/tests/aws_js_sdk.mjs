// Signs @connections requests with the AWS JS SDK v3 (Signature V4) against a gateway with
// [[management.aws_keys]]: the right secret is accepted, a wrong one gets 403, and an id that
// needs percent-encoding passes the signature check (then 410, it is not connected).
// Usage: NODE_PATH=DIR/node_modules node aws_js_sdk.mjs ENDPOINT CONNECTION_ID KEY SECRET
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH, "noop.js"));
const {
  ApiGatewayManagementApiClient,
  PostToConnectionCommand,
  GetConnectionCommand,
} = require("@aws-sdk/client-apigatewaymanagementapi");

const [endpoint, connectionId, accessKeyId, secretAccessKey] = process.argv.slice(2);
const client = (secret) =>
  new ApiGatewayManagementApiClient({
    endpoint,
    region: "ap-southeast-2",
    credentials: { accessKeyId, secretAccessKey: secret },
  });

await client(secretAccessKey).send(
  new PostToConnectionCommand({ ConnectionId: connectionId, Data: "signed by the js sdk" }),
);
console.log("signed ok");

try {
  await client(secretAccessKey + "x").send(
    new PostToConnectionCommand({ ConnectionId: connectionId, Data: "forged" }),
  );
  throw new Error("a wrong secret was accepted");
} catch (error) {
  if (error.$metadata?.httpStatusCode !== 403 || error.name !== "InvalidSignatureException") {
    throw error;
  }
  console.log("wrong secret refused");
}

try {
  await client(secretAccessKey).send(new GetConnectionCommand({ ConnectionId: "abc=/+x" }));
  throw new Error("expected GoneException");
} catch (error) {
  if (error.name !== "GoneException") throw error;
  console.log("encoded id signed ok");
}
