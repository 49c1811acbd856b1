"""The kernel store: Zarr v3 layout, typed job spec, fingerprint, markers, lock."""

from ._fingerprint import (
    FIELDS as FIELDS,
    array_digest as array_digest,
    check_same_job as check_same_job,
    digest as digest,
    fingerprint as fingerprint,
    model_digest as model_digest,
    params_digest as params_digest,
    resume_words as resume_words,
)
from ._lock import StoreLock as StoreLock, lock_path as lock_path
from ._spec import InputRecord as InputRecord, StoreSpec as StoreSpec
from ._tiles import (
    checksum as checksum,
    mirror_block as mirror_block,
    write_tile as write_tile,
)
from ._zarr import (
    KernelStore as KernelStore,
    is_url as is_url,
    remove_store as remove_store,
    store_state as store_state,
)
