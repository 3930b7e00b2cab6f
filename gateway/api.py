"""REST API for the node registry (staff only): what the admin does, for scripts."""

from __future__ import annotations

from rest_framework import decorators, response, routers, serializers, viewsets

from gateway import services
from gateway.models import Node


class NodeSerializer(serializers.ModelSerializer):
    class Meta:
        model = Node
        exclude = ["id"]
        read_only_fields = [
            "last_seen_at",
            "last_seen_address",
            "last_error",
            "last_error_at",
            "created_at",
            "updated_at",
        ]


class NodeViewSet(viewsets.ModelViewSet):
    queryset = Node.objects.all()
    serializer_class = NodeSerializer
    lookup_field = "name"

    @decorators.action(detail=True, methods=["post"])
    def verify(self, request, name: str | None = None) -> response.Response:
        result = services.verify_node(node=self.get_object())
        return response.Response({"ok": result.ok, "message": result.message, "rtt_ms": result.rtt_ms})


router = routers.DefaultRouter()
router.register("nodes", NodeViewSet)
