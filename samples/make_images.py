"""Draw the sample images in samples/images/ (committed; run again to recreate them).

    .venv/bin/python samples/make_images.py

Simple shapes in flat colours: a few KB each, in the four formats the vision APIs
take, at sizes that cost different numbers of 512 px tiles.
"""

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent / "images"


def red_circle() -> Image.Image:  # 64 x 64: one tile
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 56, 56), fill="red")
    return image


def sunset() -> Image.Image:  # 800 x 600: 2 x 2 tiles
    image = Image.new("RGB", (800, 600))
    draw = ImageDraw.Draw(image)
    for y in range(600):
        draw.line((0, y, 800, y), fill=(255, 140 - y // 6, 60 + y // 8))
    draw.ellipse((330, 380, 470, 520), fill=(255, 220, 80))
    draw.rectangle((0, 480, 800, 600), fill=(20, 40, 90))
    return image


def stripes() -> Image.Image:  # 1200 x 400: 3 x 1 tiles
    image = Image.new("RGB", (1200, 400), "white")
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate(("navy", "gold", "teal", "crimson", "olive", "purple")):
        draw.rectangle((i * 200, 0, i * 200 + 199, 399), fill=colour)
    return image


def tower() -> Image.Image:  # 300 x 900: 1 x 2 tiles
    image = Image.new("RGB", (300, 900), (200, 230, 255))
    draw = ImageDraw.Draw(image)
    draw.polygon(((150, 60), (60, 860), (240, 860)), fill=(90, 90, 100))
    draw.rectangle((0, 860, 300, 900), fill="green")
    return image


def checkers() -> Image.Image:  # 2048 x 1024, shown at 1536 x 768: 3 x 2 tiles
    image = Image.new("P", (2048, 1024), 0)
    image.putpalette([255, 255, 255, 0, 0, 0])
    draw = ImageDraw.Draw(image)
    for x in range(0, 2048, 256):
        for y in range(0, 1024, 256):
            if (x + y) // 256 % 2:
                draw.rectangle((x, y, x + 255, y + 255), fill=1)
    return image


if __name__ == "__main__":
    HERE.mkdir(exist_ok=True)
    red_circle().save(HERE / "red_circle.png", optimize=True)
    sunset().save(HERE / "sunset.jpg", quality=60, optimize=True)
    stripes().save(HERE / "stripes.png", optimize=True)
    tower().save(HERE / "tower.webp", quality=60)
    checkers().save(HERE / "checkers.gif")
