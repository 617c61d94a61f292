"""The vision service in-process: images made with Pillow, a tiny ViT saved and loaded for real."""

from __future__ import annotations

import base64
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image
from vision_nlp_fixtures import encode, save_tiny_vit, wait_until_settled

from aisemble.services.vision.app import create
from aisemble.services.vision.engine import VisionEngine
from aisemble.services.vision.schemas import BASE64_PATTERN
from aisemble.services.vision.settings import VisionSettings

RED, BLUE = (255, 0, 0), (0, 0, 255)
LABELS = {0: "cat", 1: "dog", 2: "fish", 3: "bird"}


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create(VisionSettings())) as client:
        yield client


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("vit"), LABELS)


def two_colours(size: tuple[int, int] = (100, 40), split: int = 75) -> Image.Image:
    """Red on the left `split` percent of the width, blue on the rest."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] * split // 100, 0, size[0], size[1]))
    return image


def as_json(data: bytes, **options: object) -> dict[str, object]:
    return {"image": base64.b64encode(data).decode(), **options}


# --- describing images ------------------------------------------------------


def test_a_png_is_described_with_its_two_colours_and_their_shares(client: TestClient) -> None:
    response = client.post("/analyze", json=as_json(encode(two_colours(), "PNG")))

    assert response.status_code == 200
    body = response.json()
    assert (body["format"], body["width"], body["height"], body["mode"]) == ("PNG", 100, 40, "RGB")
    assert body["frames"] == 1
    assert body["exif"] == {}
    assert body["dominant_colours"] == [
        {"rgb": [255, 0, 0], "hex": "#ff0000", "fraction": 0.75},
        {"rgb": [0, 0, 255], "hex": "#0000ff", "fraction": 0.25},
    ]
    assert body["classification"] is None
    assert "VISION_MODEL_PATH" in body["note"]


def test_a_large_image_is_sampled_but_keeps_its_colour_shares(client: TestClient) -> None:
    image = two_colours(size=(1200, 900), split=30)

    body = client.post("/analyze", json=as_json(encode(image, "PNG"))).json()

    shares = {tuple(c["rgb"]): c["fraction"] for c in body["dominant_colours"]}
    assert shares.keys() == {RED, BLUE}
    assert shares[RED] == pytest.approx(0.3, abs=0.01)
    assert shares[BLUE] == pytest.approx(0.7, abs=0.01)


def test_exif_written_by_pillow_comes_back_by_tag_name(client: TestClient) -> None:
    exif = Image.Exif()
    exif[0x010F] = "Acme"  # Make
    exif[0x0110] = "Pinhole 1"  # Model
    exif[0x0112] = 6  # Orientation
    exif.get_ifd(ExifTags.IFD.Exif)[0x9003] = "2024:05:06 07:08:09"  # DateTimeOriginal
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[1] = "N"  # GPSLatitudeRef
    gps[2] = (52.0, 31.0, 12.5)  # GPSLatitude, stored as rationals
    data = encode(two_colours(), "JPEG", exif=exif, quality=95)

    body = client.post("/analyze", json=as_json(data)).json()

    assert body["format"] == "JPEG"
    assert body["exif"]["Make"] == "Acme"
    assert body["exif"]["Model"] == "Pinhole 1"
    assert body["exif"]["Orientation"] == 6
    assert body["exif"]["DateTimeOriginal"] == "2024:05:06 07:08:09"
    assert body["exif"]["GPSInfo"] == {"GPSLatitudeRef": "N", "GPSLatitude": [52.0, 31.0, 12.5]}


def _half_transparent() -> tuple[Image.Image, dict]:
    # Half opaque red, half fully transparent blue: invisible pixels have no colour.
    image = Image.new("RGBA", (40, 40), (0, 0, 255, 0))
    image.paste((255, 0, 0, 255), (0, 0, 20, 40))
    return image, {RED: 1.0}


def _grey_levels() -> tuple[Image.Image, dict]:
    image = Image.new("L", (40, 40), 0)
    image.paste(200, (0, 0, 40, 20))
    return image, {(0, 0, 0): 0.5, (200, 200, 200): 0.5}


def _deep_grey() -> tuple[Image.Image, dict]:
    # 16 bits per pixel: Pillow alone would clip every non-zero level to white.
    image = Image.new("I;16", (40, 40), 0)
    image.paste(32896, (0, 0, 40, 20))  # 128 * 257, mid-grey
    return image, {(0, 0, 0): 0.5, (128, 128, 128): 0.5}


def _palette() -> tuple[Image.Image, dict]:
    return two_colours(split=50).convert("P", colors=2), {RED: 0.5, BLUE: 0.5}


@pytest.mark.parametrize(
    ("make", "format", "mode"),
    [
        (_half_transparent, "PNG", "RGBA"),
        (_palette, "GIF", "P"),
        (_grey_levels, "PNG", "L"),
        (_grey_levels, "WEBP", "RGB"),  # WebP has no grey mode: Pillow decodes it as RGB
        (_deep_grey, "PNG", "I;16"),
    ],
    ids=["rgba-png", "palette-gif", "grey-png", "grey-webp", "16-bit-png"],
)
def test_each_pixel_mode_is_reported_and_its_colours_found(
    client: TestClient, make, format: str, mode: str
) -> None:
    image, expected = make()
    options = {"lossless": True} if format == "WEBP" else {}

    body = client.post("/analyze", json=as_json(encode(image, format, **options))).json()

    assert (body["format"], body["mode"]) == (format, mode)
    found = {tuple(c["rgb"]): c["fraction"] for c in body["dominant_colours"]}
    assert found == pytest.approx(expected)


def test_dominant_colours_come_most_common_first_and_at_most_as_many_as_asked(
    client: TestClient,
) -> None:
    image = Image.new("RGB", (100, 10), (0, 0, 0))
    for index, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        image.paste(colour, (index * 10, 0, index * 10 + 10 + index * 5, 10))

    body = client.post("/analyze", json=as_json(encode(image, "PNG"), colours=3)).json()

    fractions = [c["fraction"] for c in body["dominant_colours"]]
    assert len(fractions) == 3
    assert fractions == sorted(fractions, reverse=True)


# --- the two ways in --------------------------------------------------------


def test_multipart_json_and_data_urls_give_the_same_answer(client: TestClient) -> None:
    data = encode(two_colours(), "PNG")
    encoded = base64.b64encode(data).decode()

    uploaded = client.post("/analyze", files={"image": ("red.png", data, "image/png")})
    as_base64 = client.post("/analyze", json={"image": encoded})
    as_data_url = client.post("/analyze", json={"image": f"data:image/png;base64,{encoded}"})
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    as_mime_lines = client.post("/analyze", json={"image": wrapped})

    assert uploaded.status_code == 200
    assert uploaded.json() == as_base64.json() == as_data_url.json() == as_mime_lines.json()


def test_multipart_form_fields_carry_the_options(client: TestClient) -> None:
    data = encode(two_colours(), "PNG")

    response = client.post(
        "/analyze",
        files={"image": ("red.png", data, "image/png")},
        data={"colours": "1", "classify": "false"},
    )

    assert response.status_code == 200
    # One colour for the whole image: median cut's average of it, covering every pixel.
    assert [c["fraction"] for c in response.json()["dominant_colours"]] == [1.0]
    assert response.json()["note"] == "classification was not requested"


# --- refusals ---------------------------------------------------------------


def _message(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    return " ".join(error["msg"] for error in response.json()["detail"])


def test_bytes_that_are_no_image_get_422(client: TestClient) -> None:
    response = client.post("/analyze", json=as_json(b"this is plain text, not a picture"))
    assert "not an image" in _message(response)


def test_invalid_base64_gets_422(client: TestClient) -> None:
    assert "base64" in _message(client.post("/analyze", json={"image": "*** not base64 ***"}))


def test_a_truncated_image_gets_422(client: TestClient) -> None:
    data = encode(Image.effect_noise((200, 200), 64).convert("RGB"), "PNG")
    assert "truncated or corrupt" in _message(
        client.post("/analyze", json=as_json(data[: len(data) // 2]))
    )


def test_multipart_without_an_image_field_gets_422(client: TestClient) -> None:
    response = client.post("/analyze", files={"picture": ("x.png", b"abc", "image/png")})
    assert "no `image` field" in _message(response)


def test_multipart_options_are_read_as_the_schema_types_them(client: TestClient) -> None:
    png = {"image": ("x.png", encode(two_colours(), "PNG"), "image/png")}
    accepted = client.post("/analyze", files=png, data={"classify": "false", "top_k": "3"})
    assert accepted.status_code == 200, accepted.text
    # pydantic alone took "0" and "yes" for booleans: the schema says true or false.
    for options in ({"classify": "0"}, {"classify": "yes"}, {"top_k": "3.5"}, {"top_k": "0"}):
        response = client.post("/analyze", files=png, data=options)
        assert response.status_code == 422, options
        assert response.json()["detail"][0]["loc"] == ["body", next(iter(options))]


def test_a_multipart_field_the_schema_does_not_name_gets_422(client: TestClient) -> None:
    png = {"image": ("x.png", encode(two_colours(), "PNG"), "image/png")}
    response = client.post("/analyze", files=png, data={"colour": "5"})
    assert "no such field" in _message(response)
    # So many fields that Starlette's parser gives up: a 422 too, not its bare 400.
    many = {f"f{i}": "1" for i in range(6)}
    assert "cannot be read" in _message(client.post("/analyze", files=png, data=many))


def test_json_options_are_strict_but_whole_floats_are_integers(client: TestClient) -> None:
    data = encode(two_colours(), "PNG")
    assert client.post("/analyze", json=as_json(data, top_k=3.0)).status_code == 200
    for options in ({"classify": 0}, {"top_k": "3"}, {"colours": True}):
        response = client.post("/analyze", json=as_json(data, **options))
        assert response.status_code == 422, options


def test_a_json_body_that_is_not_utf8_gets_422(client: TestClient) -> None:
    # Its error once echoed the raw bytes, which JSON cannot carry: a 500.
    response = client.post(
        "/analyze", content=b"\x80", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet="QUJD+/= \t\r\n\x0b\x1c\u2003data:;,", max_size=14))
def test_the_published_base64_pattern_is_what_decodes(text: str) -> None:
    with TestClient(create(VisionSettings())) as client:
        response = client.post("/analyze", json={"image": text or "=", "classify": False})
    assert response.status_code == 422  # no picture is that small
    (error,) = response.json()["detail"]
    decodes = "not valid base64" not in error["msg"]
    assert decodes == bool(re.search(BASE64_PATTERN, text or "=")), error


def test_the_schema_says_what_is_accepted(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/analyze"]["post"]
    upload = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["top_k"]["minimum"] == 1
    assert upload["properties"]["colours"]["maximum"] == 32
    assert upload["additionalProperties"] is False
    image = operation["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert image["image"]["pattern"] == BASE64_PATTERN
    assert {"200", "413", "415", "422", "503"} <= set(operation["responses"])


def test_out_of_range_options_get_422(client: TestClient) -> None:
    data = encode(two_colours(), "PNG")
    assert client.post("/analyze", json=as_json(data, top_k=0)).status_code == 422
    assert client.post("/analyze", json=as_json(data, colours=99)).status_code == 422


def test_an_unsupported_content_type_gets_415(client: TestClient) -> None:
    response = client.post("/analyze", content=b"\x89PNG", headers={"content-type": "image/png"})
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]


def test_a_body_over_20_mib_gets_413(client: TestClient) -> None:
    response = client.post(
        "/analyze",
        content=b"0" * (20 * 2**20 + 1),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims another size: a decompression bomb's shape."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_a_decompression_bomb_is_refused_before_decoding(client: TestClient) -> None:
    message = _message(client.post("/analyze", json=as_json(_png_claiming(100_000, 100_000))))
    assert "too many pixels" in message


def test_images_over_the_pixel_limit_are_refused() -> None:
    with TestClient(create(VisionSettings(max_pixels=10_000))) as client:
        small = client.post("/analyze", json=as_json(encode(two_colours((100, 100)), "PNG")))
        large = client.post("/analyze", json=as_json(encode(two_colours((101, 100)), "PNG")))

    assert small.status_code == 200
    assert "10100 pixels, more than the limit of 10000" in _message(large)


# --- classification ---------------------------------------------------------


def test_the_model_classifies_with_its_own_labels_and_probabilities(vit_dir: Path) -> None:
    settings = VisionSettings(model_path=str(vit_dir))
    with TestClient(create(settings)) as client:
        assert wait_until_settled(client)["status"] == "ready"
        data = encode(two_colours(), "JPEG")
        everything = client.post("/analyze", json=as_json(data, top_k=10)).json()
        top_two = client.post("/analyze", json=as_json(data, top_k=2)).json()
        metrics = client.get("/metrics").text

    labels = everything["classification"]
    assert {label["label"] for label in labels} == set(LABELS.values())
    assert sum(label["score"] for label in labels) == pytest.approx(1, abs=1e-5)
    scores = [label["score"] for label in labels]
    assert scores == sorted(scores, reverse=True)
    assert top_two["classification"] == labels[:2]
    assert everything["model"] == vit_dir.name
    assert everything["note"] is None
    assert "vision_inference_duration_seconds_count 2.0" in metrics
    assert 'vision_images_analyzed_total{format="JPEG"} 2.0' in metrics


class GatedEngine(VisionEngine):
    """Loads only once the test opens the gate, so 'still loading' can be observed."""

    def __init__(self, settings: VisionSettings) -> None:
        super().__init__(settings)
        self.gate = threading.Event()

    def load(self) -> None:
        assert self.gate.wait(30), "the test never opened the gate"
        super().load()


def test_while_the_model_loads_only_classifying_waits(vit_dir: Path) -> None:
    settings = VisionSettings(model_path=str(vit_dir), load_retry_after=7)
    engine = GatedEngine(settings)
    data = encode(two_colours(), "PNG")
    with TestClient(create(settings, engine)) as client:
        ready = client.get("/ready")
        classify = client.post("/analyze", json=as_json(data))
        describe = client.post("/analyze", json=as_json(data, classify=False))
        engine.gate.set()
        settled = wait_until_settled(client)
        after = client.post("/analyze", json=as_json(data))

    assert (ready.status_code, ready.headers["retry-after"]) == (503, "7")
    assert ready.json()["status"] == "loading"
    assert (classify.status_code, classify.headers["retry-after"]) == (503, "7")
    assert "still loading" in classify.json()["detail"]
    assert describe.status_code == 200
    assert settled["status"] == "ready"
    assert len(after.json()["classification"]) == len(LABELS)


def test_a_model_that_fails_to_load_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VISION_MODEL_PATH", str(tmp_path / "missing"))
    data = encode(two_colours(), "PNG")
    with TestClient(create()) as client:
        settled = wait_until_settled(client)
        ready = client.get("/ready")
        classify = client.post("/analyze", json=as_json(data))
        describe = client.post("/analyze", json=as_json(data, classify=False))

    assert settled["status"] == "failed"
    assert ready.status_code == 503
    assert "missing" in settled["detail"] and "not a directory" in settled["detail"]
    assert classify.status_code == 503
    assert "failed to load" in classify.json()["detail"]
    assert describe.status_code == 200


def test_without_a_model_the_service_is_ready_at_once(client: TestClient) -> None:
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"
