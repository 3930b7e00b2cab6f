from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway"

    def ready(self) -> None:
        from gateway.dimse import guard, reactor

        reactor.install()  # every process that opens associations: listener, worker, web (Verify)
        guard.install()  # bounded PDUs and deadlines on every association, ours or theirs
