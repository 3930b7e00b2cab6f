from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway"

    def ready(self) -> None:
        from gateway import web_limits  # noqa: F401 - connects the login signals
        from gateway.dimse import reactor

        reactor.install()  # every process that opens associations: listener, worker, web (Verify)
