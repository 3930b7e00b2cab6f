"""REST API for the node registry (admin scope or staff): what the admin does, for scripts."""

from __future__ import annotations

from rest_framework import decorators, response, routers, serializers, viewsets

from dicomweb.auth import AdminScope
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
    permission_classes = [AdminScope]  # who may talk to us is configuration, read or changed
    lookup_field = "name"

    @decorators.action(detail=True, methods=["post"])
    def verify(self, request, name: str | None = None) -> response.Response:
        result = services.verify_node(node=self.get_object())
        return response.Response({"ok": result.ok, "message": result.message, "rtt_ms": result.rtt_ms})


router = routers.DefaultRouter()
router.register("nodes", NodeViewSet)
