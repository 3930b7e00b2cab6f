from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway"

    def ready(self) -> None:
        from gateway import privacy, web_limits  # noqa: F401 - web_limits connects the login signals
        from gateway.dimse import guard, reactor

        reactor.install()  # every process that opens associations: listener, worker, web (Verify)
        guard.install()  # bounded PDUs and deadlines on every association, ours or theirs
        privacy.quiet_pydicom()  # every process reads data sets; pydicom's warnings quote patient data
