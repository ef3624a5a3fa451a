"""Drives Switchboard's @connections API with boto3's real apigatewaymanagementapi client.

Usage: boto3_client.py ENDPOINT_URL CONNECTION_ID
Prints one line per step; exits non-zero on the first surprise.
"""
import sys

import boto3

endpoint, connection_id = sys.argv[1], sys.argv[2]
client = boto3.client(
    "apigatewaymanagementapi",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="dummy",
    aws_secret_access_key="dummy",
)

client.post_to_connection(ConnectionId=connection_id, Data=b"hello from boto3")
print("post ok")

status = client.get_connection(ConnectionId=connection_id)
assert status["Identity"]["SourceIp"] == "127.0.0.1", status
assert status["ConnectedAt"].year >= 2024, status
assert status["LastActiveAt"] >= status["ConnectedAt"], status
print("get ok")

client.delete_connection(ConnectionId=connection_id)
print("delete ok")

try:
    client.post_to_connection(ConnectionId=connection_id, Data=b"too late")
except client.exceptions.GoneException:
    print("gone ok")
else:
    sys.exit("expected GoneException after delete")

try:
    client.post_to_connection(ConnectionId=connection_id + "x", Data=b"x" * 200_000)
except client.exceptions.PayloadTooLargeException:
    print("too large ok")
else:
    sys.exit("expected PayloadTooLargeException")
