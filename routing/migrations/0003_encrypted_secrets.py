# Destination secrets encrypted at rest (gateway/encryption.py): the columns become text (a token is
# longer than its secret), then every plain value saved before is encrypted in place.

import gateway.encryption
from django.db import migrations

SECRETS = ("password", "token", "oauth_client_secret")


def _rows(Destination, schema_editor):
    """(id, {field: stored value}) straight from the table, before any decryption."""
    quote = schema_editor.quote_name
    columns = ", ".join(quote(name) for name in SECRETS)
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(f"SELECT id, {columns} FROM {quote(Destination._meta.db_table)}")
        return [(row[0], dict(zip(SECRETS, row[1:]))) for row in cursor.fetchall()]


def encrypt_plain_secrets(apps, schema_editor):
    Destination = apps.get_model("routing", "Destination")
    for pk, stored in _rows(Destination, schema_editor):
        plain = {name: value for name, value in stored.items() if value and not value.startswith(gateway.encryption.PREFIX)}
        if plain:
            Destination.objects.filter(pk=pk).update(**plain)  # the field encrypts what it writes


def decrypt_secrets(apps, schema_editor):
    Destination = apps.get_model("routing", "Destination")
    quote = schema_editor.quote_name
    for pk, stored in _rows(Destination, schema_editor):
        for name, value in stored.items():
            plain = gateway.encryption.decrypt(value or "")
            if isinstance(plain, gateway.encryption.UndecryptableSecret):
                raise RuntimeError(f"destination {pk}: {name} {plain.reason}")
            if plain != (value or ""):
                schema_editor.execute(
                    f"UPDATE {quote(Destination._meta.db_table)} SET {quote(name)} = %s WHERE id = %s", [plain, pk]
                )


class Migration(migrations.Migration):

    dependencies = [
        ('routing', '0002_forwardjob_batch'),
    ]

    operations = [
        migrations.AlterField(
            model_name='destination',
            name='oauth_client_secret',
            field=gateway.encryption.EncryptedField(blank=True, max_length=255),
        ),
        migrations.AlterField(
            model_name='destination',
            name='password',
            field=gateway.encryption.EncryptedField(blank=True, help_text='HTTP basic password.', max_length=255),
        ),
        migrations.AlterField(
            model_name='destination',
            name='token',
            field=gateway.encryption.EncryptedField(blank=True, help_text='Static bearer token.', max_length=2000),
        ),
        migrations.RunPython(encrypt_plain_secrets, decrypt_secrets),
    ]
