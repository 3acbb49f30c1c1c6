"""From video files and JSONL manifests to LitData streams of packed sequences."""

from kangaroo.storage import allow_plain_http_endpoints

allow_plain_http_endpoints()
