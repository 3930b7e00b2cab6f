from django.apps import AppConfig


class DICOMwebConfig(AppConfig):
    name = "dicomweb"
    verbose_name = "DICOMweb"
