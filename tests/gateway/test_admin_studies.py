"""The studies browser, the instance list and the dashboard, as a logged-in administrator sees them."""

from __future__ import annotations

import re

import pytest
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils import timezone
from pydicom.uid import generate_uid

from gateway import dashboard
from gateway.models import CommitmentRequest, Heartbeat, Instance, Node, Patient, Series, Study

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"


def make_study(number: int, modalities: tuple[str, ...], per_series: int, size: int, calling_ae: str = "CT1") -> Study:
    patient, _ = Patient.objects.get_or_create(
        patient_id=f"PID{number}", defaults={"patient_name": f"Doe^Jane{number}"}
    )
    now = timezone.now()
    study = Study.objects.create(
        study_instance_uid=generate_uid(), patient=patient, study_date=now.strftime("%Y%m%d"),
        accession_number=f"ACC{number}", calling_ae=calling_ae, received_at=now,
    )  # fmt: skip
    for series_number, modality in enumerate(modalities, 1):
        series = Series.objects.create(
            series_instance_uid=generate_uid(), study=study, modality=modality, series_number=series_number,
            received_at=now,
        )  # fmt: skip
        for instance_number in range(1, per_series + 1):
            sop = generate_uid()
            Instance.objects.create(
                sop_instance_uid=sop, series=series, sop_class_uid=CT if modality == "CT" else MR,
                instance_number=instance_number, transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"x/{sop}.dcm",
                size=size, sha256="0" * 64, calling_ae=calling_ae, received_at=now,
            )  # fmt: skip
    return study


def rows(html: str) -> list[str]:
    return re.findall(r"<tr[^>]*>.*?</tr>", html, re.S)


@pytest.fixture
def studies(db) -> list[Study]:
    return [
        make_study(1, ("CT", "CT"), per_series=3, size=1000),  # 6 instances, 6000 bytes
        make_study(2, ("MR",), per_series=2, size=2048, calling_ae="MR1"),  # 2 instances, 4 KB
        make_study(3, ("CT", "MR"), per_series=1, size=500),  # 2 instances, 1000 bytes
    ]


def test_study_list_shows_counts_sizes_and_modalities(admin_client, studies):
    response = admin_client.get(reverse("admin:gateway_study_changelist"))
    assert response.status_code == 200
    page = response.content.decode()
    by_uid = {
        study.study_instance_uid: row for row in rows(page) for study in studies if study.study_instance_uid in row
    }
    first, second, third = (by_uid[s.study_instance_uid] for s in studies)
    assert "Doe Jane1" in first and ">6</a>" in first and filesizeformat(6000) in first and "CT<" in first
    assert ">2</a>" in second and filesizeformat(4096) in second and "MR<" in second and "MR1" in second
    assert "CT, MR" in third and filesizeformat(1000) in third


def test_study_list_queries_do_not_grow_with_the_number_of_studies(
    admin_client, studies, django_assert_max_num_queries
):
    url = reverse("admin:gateway_study_changelist")
    admin_client.get(url)  # warm the session and content types
    with django_assert_max_num_queries(12) as few:
        admin_client.get(url)
    for number in range(4, 24):
        make_study(number, ("CT", "MR", "SR"), per_series=2, size=10)
    with django_assert_max_num_queries(len(few.captured_queries)):
        response = admin_client.get(url)
    assert response.content.decode().count("ACC2") >= 1


def test_study_list_filters_and_searches(admin_client, studies):
    url = reverse("admin:gateway_study_changelist")
    mr_only = admin_client.get(url, {"modality": "MR"}).content.decode()
    assert studies[1].study_instance_uid in mr_only and studies[2].study_instance_uid in mr_only
    assert studies[0].study_instance_uid not in mr_only
    # Filtering on a series modality must not multiply the counts of a study with two CT series.
    ct = admin_client.get(url, {"modality": "CT"}).content.decode()
    assert ">6</a>" in next(row for row in rows(ct) if studies[0].study_instance_uid in row)
    by_ae = admin_client.get(url, {"calling_ae": "MR1"}).content.decode()
    assert studies[1].study_instance_uid in by_ae and studies[0].study_instance_uid not in by_ae
    for term in ("ACC3", "PID3", studies[2].study_instance_uid):
        found = admin_client.get(url, {"q": term}).content.decode()
        assert studies[2].study_instance_uid in found and studies[0].study_instance_uid not in found, term
    today = admin_client.get(url, {"study_date": "today"}).content.decode()
    assert all(study.study_instance_uid in today for study in studies)


def test_study_page_lists_series_and_links_to_its_instances(admin_client, studies):
    study = studies[0]
    page = admin_client.get(reverse("admin:gateway_study_change", args=[study.pk])).content.decode()
    assert page.count("instance list") == 2 and filesizeformat(3000) in page
    assert "Save" not in page  # read-only
    series = study.series.order_by("series_number").first()
    listing = admin_client.get(reverse("admin:gateway_instance_changelist"), {"series__id__exact": series.pk})
    assert listing.status_code == 200
    listed = listing.content.decode()
    assert all(i.sop_instance_uid in listed for i in series.instances.all())
    other = studies[1].series.first().instances.first()
    assert other.sop_instance_uid not in listed
    by_study = admin_client.get(reverse("admin:gateway_instance_changelist"), {"series__study__id__exact": study.pk})
    assert by_study.status_code == 200
    assert (
        sum(i.sop_instance_uid in by_study.content.decode() for i in Instance.objects.filter(series__study=study)) == 6
    )


def test_index_is_read_only(admin_client, studies):
    assert admin_client.get(reverse("admin:gateway_study_add")).status_code == 403
    assert admin_client.post(reverse("admin:gateway_study_delete", args=[studies[0].pk])).status_code == 403
    assert Study.objects.count() == 3


def test_dashboard_shows_storage_processes_nodes_and_pending_reports(
    admin_client, studies, django_assert_max_num_queries
):
    Node.objects.create(name="ct-1", ae_title="CT1", host="127.0.0.1", last_error="Verify: connection refused")
    now = timezone.now()
    Heartbeat.objects.create(
        kind="dimse", instance="host:1", address="ISTHMUS@0.0.0.0:11112", started_at=now, beat_at=now
    )
    CommitmentRequest.objects.create(
        transaction_uid="1.2.3.4", calling_ae="CT1", referenced=[], received_at=now, last_error="refused"
    )
    with django_assert_max_num_queries(20):
        response = admin_client.get(reverse("admin:index"))
    page = response.content.decode()
    assert response.status_code == 200
    assert re.search(r'id="bytes-used">\s*' + re.escape(filesizeformat(6000 + 4096 + 1000)), page)
    for name, count in (("patients", 3), ("studies", 3), ("series", 5), ("instances", 10), ("commitments-pending", 1)):
        assert f'id="{"count-" if "commit" not in name else ""}{name}">{count}<' in page, name
    assert "ISTHMUS@0.0.0.0:11112" in page and "alive" in page
    assert "Verify: connection refused" in page and "1.2.3.4" in page
    assert 'id="disk-free"' in page and "Gateway" in page  # the app list is still there


def test_summary_counts(studies):
    summary = dashboard.summary()
    assert summary["storage"]["bytes_used"] == 11096 and summary["storage"]["instances"] == 10
    assert summary["storage"]["disk_free"] > 0 and summary["commitments"]["pending"] == 0
