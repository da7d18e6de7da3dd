"""The vCenter test bed: govmomi's simulator built here, spoken to by pyvmomi over TLS."""

from __future__ import annotations

import ssl
import time
from typing import Any

import pytest

from hamal_workers.testbeds import vcenter as testbed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def vc(start_vcenter: Any) -> testbed.VCenter:
    return start_vcenter()


def connect(vc: testbed.VCenter, context: ssl.SSLContext, password: str | None = None) -> object:
    from pyVim.connect import SmartConnect

    return SmartConnect(
        host=vc.host, port=vc.port, user=vc.user, pwd=password or vc.password, sslContext=context
    )


def trusted(vc: testbed.VCenter) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(vc.ca_file))


def test_pyvmomi_sees_the_vms_and_their_disk_files(vc: testbed.VCenter) -> None:
    from pyVim.connect import Disconnect
    from pyVmomi import vim

    si = connect(vc, trusted(vc))
    try:
        content = si.RetrieveContent()  # type: ignore[attr-defined]
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        vms = list(view.view)
        assert len(vms) == 2
        for vm in vms:
            disks = [
                d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
            ]
            assert disks, vm.name
            store, path = disks[0].backing.fileName.split("] ", 1)
            folder = vc.datastores[store.lstrip("[")]
            # The disk's data is a real file the tests can write into.
            assert (folder / path).exists() or (
                folder / path.replace(".vmdk", "-flat.vmdk")
            ).exists()
    finally:
        Disconnect(si)


def test_an_untrusted_certificate_and_a_wrong_password_are_refused(vc: testbed.VCenter) -> None:
    from pyVmomi import vim

    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
        connect(vc, ssl.create_default_context())  # the system's CAs
    with pytest.raises(vim.fault.InvalidLogin):
        connect(vc, trusted(vc), password="not-the-password")
    assert vc.password not in (vc.directory / "vcsim.log").read_text()


def test_idle_sessions_expire(start_vcenter: Any) -> None:
    from pyVmomi import vim

    vc = start_vcenter(session_idle_s=1)
    si = connect(vc, trusted(vc))
    si.RetrieveContent()  # type: ignore[attr-defined]
    # Expiry is idleness itself: nothing to wait on but the time passing.
    time.sleep(2.5)
    with pytest.raises(vim.fault.NotAuthenticated):
        si.content.sessionManager.currentSession  # type: ignore[attr-defined]  # noqa: B018
