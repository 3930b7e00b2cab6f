"""A bare pynetdicom C-STORE SCP: the ceiling for any Python receiver built on pynetdicom.

    python bench/bare_scp.py PORT OUTDIR

Receives each data set to a file (pynetdicom's chunked receive, as Isthmus
does) and renames it into OUTDIR: no parsing, no fsync, no index. Used by
store_bench.py --bare as a third column, so that the share of the gap to
Orthanc that pynetdicom itself accounts for is measured, not guessed.
"""

from __future__ import annotations

import os
import sys
import tempfile

from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gateway.dimse.sockets import set_nodelay  # noqa: E402  (plain module: no Django, no reactor change)


def main() -> None:
    port, out = int(sys.argv[1]), sys.argv[2]
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = lambda *a, **k: tempfile.NamedTemporaryFile(*a, **{**k, "dir": out})

    def handle_store(event: evt.Event) -> int:
        os.rename(event.dataset_path, os.path.join(out, f"{event.request.AffectedSOPInstanceUID}.dcm"))
        return 0x0000

    ae = AE("BARE")
    ae.maximum_pdu_size = 131072
    ae.maximum_associations = 64
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, uid.UncompressedTransferSyntaxes)
    handlers = [(evt.EVT_C_STORE, handle_store), (evt.EVT_CONN_OPEN, set_nodelay)]
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=handlers)


if __name__ == "__main__":
    main()
