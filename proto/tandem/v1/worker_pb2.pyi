from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_PREFILL: _ClassVar[Role]
    ROLE_DECODE: _ClassVar[Role]
    ROLE_AGGREGATED: _ClassVar[Role]

class PoolKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOL_KIND_UNSPECIFIED: _ClassVar[PoolKind]
    POOL_KIND_SWA_WINDOW: _ClassVar[PoolKind]
    POOL_KIND_COMPRESSOR_STATE: _ClassVar[PoolKind]
    POOL_KIND_BLOCK: _ClassVar[PoolKind]

class ClaimStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLAIM_STATUS_UNSPECIFIED: _ClassVar[ClaimStatus]
    CLAIM_STATUS_GRANTED: _ClassVar[ClaimStatus]
    CLAIM_STATUS_EXPIRED: _ClassVar[ClaimStatus]
ROLE_UNSPECIFIED: Role
ROLE_PREFILL: Role
ROLE_DECODE: Role
ROLE_AGGREGATED: Role
POOL_KIND_UNSPECIFIED: PoolKind
POOL_KIND_SWA_WINDOW: PoolKind
POOL_KIND_COMPRESSOR_STATE: PoolKind
POOL_KIND_BLOCK: PoolKind
CLAIM_STATUS_UNSPECIFIED: ClaimStatus
CLAIM_STATUS_GRANTED: ClaimStatus
CLAIM_STATUS_EXPIRED: ClaimStatus

class WorkerId(_message.Message):
    __slots__ = ("instance", "dp_rank")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    instance: str
    dp_rank: int
    def __init__(self, instance: _Optional[str] = ..., dp_rank: _Optional[int] = ...) -> None: ...

class KvStored(_message.Message):
    __slots__ = ("block_hashes", "parent_hash", "held_only")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    PARENT_HASH_FIELD_NUMBER: _ClassVar[int]
    HELD_ONLY_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    parent_hash: int
    held_only: bool
    def __init__(self, block_hashes: _Optional[_Iterable[int]] = ..., parent_hash: _Optional[int] = ..., held_only: _Optional[bool] = ...) -> None: ...

class KvRemoved(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class KvCleared(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KvEvent(_message.Message):
    __slots__ = ("seq", "stored", "removed", "cleared")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    stored: KvStored
    removed: KvRemoved
    cleared: KvCleared
    def __init__(self, seq: _Optional[int] = ..., stored: _Optional[_Union[KvStored, _Mapping]] = ..., removed: _Optional[_Union[KvRemoved, _Mapping]] = ..., cleared: _Optional[_Union[KvCleared, _Mapping]] = ...) -> None: ...

class KvEventBatch(_message.Message):
    __slots__ = ("worker", "events", "last_seq")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerId
    events: _containers.RepeatedCompositeFieldContainer[KvEvent]
    last_seq: int
    def __init__(self, worker: _Optional[_Union[WorkerId, _Mapping]] = ..., events: _Optional[_Iterable[_Union[KvEvent, _Mapping]]] = ..., last_seq: _Optional[int] = ...) -> None: ...

class KvSnapshot(_message.Message):
    __slots__ = ("worker", "seq", "block_hashes", "held_only_hashes")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    HELD_ONLY_HASHES_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerId
    seq: int
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    held_only_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, worker: _Optional[_Union[WorkerId, _Mapping]] = ..., seq: _Optional[int] = ..., block_hashes: _Optional[_Iterable[int]] = ..., held_only_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class PoolBlocks(_message.Message):
    __slots__ = ("kind", "block_ids")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    kind: PoolKind
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kind: _Optional[_Union[PoolKind, str]] = ..., block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class HandoffDescriptor(_message.Message):
    __slots__ = ("request_id", "prefill", "agent_name", "layout_hash", "epoch", "prompt_tokens", "first_token", "pools", "block_hashes", "lease_deadline_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prefill: WorkerId
    agent_name: str
    layout_hash: int
    epoch: int
    prompt_tokens: int
    first_token: int
    pools: _containers.RepeatedCompositeFieldContainer[PoolBlocks]
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    lease_deadline_ms: int
    def __init__(self, request_id: _Optional[str] = ..., prefill: _Optional[_Union[WorkerId, _Mapping]] = ..., agent_name: _Optional[str] = ..., layout_hash: _Optional[int] = ..., epoch: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., first_token: _Optional[int] = ..., pools: _Optional[_Iterable[_Union[PoolBlocks, _Mapping]]] = ..., block_hashes: _Optional[_Iterable[int]] = ..., lease_deadline_ms: _Optional[int] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ("request_id", "epoch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    epoch: int
    def __init__(self, request_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class ClaimReply(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: ClaimStatus
    def __init__(self, status: _Optional[_Union[ClaimStatus, str]] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker", "role", "queued_requests", "queued_prefill_tokens", "running_requests", "kv_blocks_used", "kv_blocks_free", "prefix_hit_rate", "prefill_tok_s", "decode_tok_s", "draining", "nvlink_domain", "kv_transfer_bytes", "kv_transfer_seconds", "kv_transfers", "kv_transfer_failures")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOK_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOK_S_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    NVLINK_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_FAILURES_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerId
    role: Role
    queued_requests: int
    queued_prefill_tokens: int
    running_requests: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_hit_rate: float
    prefill_tok_s: float
    decode_tok_s: float
    draining: bool
    nvlink_domain: str
    kv_transfer_bytes: int
    kv_transfer_seconds: float
    kv_transfers: int
    kv_transfer_failures: int
    def __init__(self, worker: _Optional[_Union[WorkerId, _Mapping]] = ..., role: _Optional[_Union[Role, str]] = ..., queued_requests: _Optional[int] = ..., queued_prefill_tokens: _Optional[int] = ..., running_requests: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., prefix_hit_rate: _Optional[float] = ..., prefill_tok_s: _Optional[float] = ..., decode_tok_s: _Optional[float] = ..., draining: _Optional[bool] = ..., nvlink_domain: _Optional[str] = ..., kv_transfer_bytes: _Optional[int] = ..., kv_transfer_seconds: _Optional[float] = ..., kv_transfers: _Optional[int] = ..., kv_transfer_failures: _Optional[int] = ...) -> None: ...
