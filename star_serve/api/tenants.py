"""Tenants and their API keys, persisted in a JSON file that is replaced atomically on every change.

Only a SHA-256 hash of each key is stored: keys are 256-bit random secrets, so a fast hash is enough to
make a leaked file useless, and lookups stay O(1).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import Conflict, NotFound

KEY_PREFIX = "sk-star-"


@dataclass
class KeyRecord:
    id: str
    tenant: str
    hash: str
    created: int


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.tenants: dict[str, int] = {}  # name -> created
        self.keys: dict[str, KeyRecord] = {}  # key id -> record
        self._by_hash: dict[str, KeyRecord] = {}
        if path.exists():
            data = json.loads(path.read_text())
            self.tenants = dict(data["tenants"])
            self.keys = {k["id"]: KeyRecord(**k) for k in data["keys"]}
            self._by_hash = {k.hash: k for k in self.keys.values()}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        data = {"tenants": self.tenants, "keys": [asdict(k) for k in self.keys.values()]}
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)

    def tenant_of(self, key: str) -> str | None:
        record = self._by_hash.get(_hash(key))  # keyed by the hash: no secret is compared byte by byte
        return None if record is None else record.tenant

    def create_tenant(self, name: str) -> int:
        with self._lock:
            if name in self.tenants:
                raise Conflict(f"tenant {name!r} exists", "name")
            self.tenants[name] = int(time.time())
            self._save()
            return self.tenants[name]

    def delete_tenant(self, name: str) -> None:
        with self._lock:
            self._require(name)
            del self.tenants[name]
            for record in [k for k in self.keys.values() if k.tenant == name]:
                del self.keys[record.id]
                del self._by_hash[record.hash]
            self._save()

    def create_key(self, tenant: str) -> tuple[KeyRecord, str]:
        with self._lock:
            self._require(tenant)
            key = KEY_PREFIX + secrets.token_urlsafe(32)
            record = KeyRecord(
                id="key-" + secrets.token_hex(6), tenant=tenant, hash=_hash(key), created=int(time.time())
            )
            self.keys[record.id] = record
            self._by_hash[record.hash] = record
            self._save()
            return record, key

    def delete_key(self, tenant: str, key_id: str) -> None:
        with self._lock:
            record = self.keys.get(key_id)
            if record is None or record.tenant != tenant:
                raise NotFound(f"no key {key_id!r} for tenant {tenant!r}", "key_id")
            del self.keys[key_id]
            del self._by_hash[record.hash]
            self._save()

    def keys_of(self, tenant: str) -> list[KeyRecord]:
        self._require(tenant)
        return [k for k in self.keys.values() if k.tenant == tenant]

    def _require(self, name: str) -> None:
        if name not in self.tenants:
            raise NotFound(f"no tenant {name!r}", "name")
