from django.urls import include, path

from worklist import api

urlpatterns = [path("", include(api.router.urls))]
