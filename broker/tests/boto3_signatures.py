"""Signs @connections requests with boto3 (AWS Signature V4) against a gateway with
[[management.aws_keys]]: the right secret is accepted, a wrong one gets 403, and an id
that needs percent-encoding passes the signature check (then 410, it is not connected).

Usage: boto3_signatures.py ENDPOINT_URL CONNECTION_ID ACCESS_KEY_ID SECRET_ACCESS_KEY
Prints one line per step; exits non-zero on the first surprise.
"""
import sys

import boto3
import botocore.exceptions

endpoint, connection_id, key, secret = sys.argv[1:5]


def client(secret_access_key):
    return boto3.client(
        "apigatewaymanagementapi",
        endpoint_url=endpoint,
        region_name="eu-central-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret_access_key,
    )


client(secret).post_to_connection(ConnectionId=connection_id, Data=b"signed by boto3")
print("signed ok")

try:
    client(secret + "x").post_to_connection(ConnectionId=connection_id, Data=b"forged")
except botocore.exceptions.ClientError as error:
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 403, error.response
    assert error.response["Error"]["Code"] == "InvalidSignatureException", error.response
    print("wrong secret refused")
else:
    sys.exit("a wrong secret was accepted")

try:
    client(secret).get_connection(ConnectionId="abc=/+x")
except client(secret).exceptions.GoneException:
    print("encoded id signed ok")
else:
    sys.exit("expected GoneException for an unknown id")
