"""Write textspan's text banks (our own word lists and templates; stdlib only, deterministic).

    python text_banks/make_banks.py

writes, next to this script:

  general.txt           short image descriptions (2-8 words) in 14 categories, for natural-image CLIP models
  shapes.txt            phrases in the shapes-world vocabulary only, for the built-in model
  templates.txt         zero-shot prompt templates for natural images (one '{}' each)
  shapes_templates.txt  zero-shot prompt templates in the shapes-world vocabulary

Each category of the general bank has some hand-written phrases (all kept) and combines a few word lists with a few
templates; a fixed-seed sample of the combinations fills the category up to its quota. A text already taken by an
earlier category is not taken again. Categories are written in order, each block sorted.
"""
from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
MIN_WORDS, MAX_WORDS = 2, 8

AN_EXCEPTIONS = {"one", "once", "uniform", "unicorn", "unicycle", "university", "european", "used", "usb", "ukulele"}
AN_EXTRA = {"hour", "honest", "x-ray"}


def art(word_phrase: str) -> str:
    """'a cat', 'an owl', 'a unicorn', 'an hour'."""
    first = word_phrase.split()[0]
    vowel = first[0] in "aeiou" and first not in AN_EXCEPTIONS
    return ("an " if vowel or first in AN_EXTRA else "a ") + word_phrase


def fill(templates, **lists):
    """Every template filled with every combination of the lists it names ({c}, {s}, ...); {a_x} = art(x)."""
    out = []
    for t in templates:
        names = sorted({n for n in lists if "{" + n + "}" in t or "{a_" + n + "}" in t})
        for combo in itertools.product(*(lists[n] for n in names)):
            values = dict(zip(names, combo))
            values.update({"a_" + n: art(v) for n, v in values.items()})
            out.append(t.format(**values))
    return out


# --------------------------------------------------------------------------------------------------------------------
# shared word lists

COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "beige",
           "turquoise", "teal", "navy blue", "maroon", "golden", "silver", "violet", "magenta", "cyan", "lime green",
           "olive green", "crimson", "lavender", "cream", "dark green", "light blue", "dark red", "pale yellow"]
MAIN_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray"]
SUBJECTS = ["cat", "dog", "house", "tree", "flower", "face", "boat", "mountain", "bird", "car", "city", "horse",
            "woman", "man", "child", "bowl of fruit", "lighthouse", "bridge", "street", "forest"]
PLACES = ["beach", "forest", "lake", "river", "desert", "mountain range", "city street", "kitchen", "office", "farm",
          "bamboo forest", "grass field", "waterfall", "jungle", "canyon", "cave", "island", "harbor", "park",
          "playground", "garden", "classroom", "library", "restaurant", "supermarket", "hospital corridor",
          "airport terminal", "train station", "parking lot", "highway", "village", "living room", "bedroom",
          "bathroom", "church", "castle", "stadium", "swamp", "meadow", "glacier", "volcano", "coral reef",
          "vineyard", "factory", "warehouse", "subway platform", "market", "temple", "pier", "cliff", "valley",
          "marsh", "pond", "rice field", "wheat field", "pine forest", "sandy shore", "rocky coast", "ocean",
          "snowy mountain", "suburban street", "rooftop", "alley", "campsite", "countryside road", "orchard"]
OUTDOOR = ["beach", "forest", "lake", "river", "desert", "city street", "farm", "bamboo forest", "grass field",
           "mountain road", "harbor", "park", "garden", "village", "meadow", "pine forest", "ocean", "countryside",
           "highway", "bridge", "field of flowers", "valley", "town square", "parking lot", "pond", "wheat field"]

# --------------------------------------------------------------------------------------------------------------------
# categories: name -> (quota, candidates)


def colours():
    fixed = []
    nouns = ["car", "dress", "flower", "wall", "door", "balloon", "umbrella", "shirt", "apple", "bicycle", "cup",
             "chair", "bus", "sky", "light", "boat", "bag", "hat", "building", "leaf"]
    out = fill(["{a_c} object", "a photo dominated by {c}", "something {c}", "{a_c} background", "the color {c}",
                "bright {c} colors", "{a_c} surface", "pale {c} tones", "a mostly {c} image", "a patch of {c}",
                "shades of {c}", "{a_c} thing", "a photo with {c} tones", "{a_c} color scheme"], c=COLOURS)
    out += fill(["{a_c} {n}"], c=MAIN_COLOURS, n=nouns)
    out += [f"{c} and {d}" for c, d in itertools.permutations(MAIN_COLOURS, 2)]
    out += [f"{art(c)} and {d} image" for c, d in itertools.combinations(MAIN_COLOURS, 2)]
    fixed += ["a red object", "a blue object", "a green object", "a photo dominated by blue",
              "a photo dominated by red", "a colorful image", "vivid colors", "muted colors", "pastel colors",
              "neon colors", "earth tones", "warm colors", "cool colors", "a monochrome image", "a rainbow of colors",
              "a single color", "dark colors", "light colors", "a grayscale image", "bright saturated colors",
              "a faded color palette"]
    return 220, out, fixed


def textures():
    fixed = []
    patterns = ["striped", "checkered", "polka dot", "zigzag", "wavy", "dotted", "spotted", "plaid", "floral",
                "paisley", "herringbone", "tartan", "honeycomb", "geometric", "swirling", "diagonal striped",
                "hexagonal", "chevron", "argyle", "leopard print", "zebra print", "camouflage", "grid",
                "diamond", "wave", "tiled", "repeating", "random"]
    surfaces = ["rough", "smooth", "bumpy", "glossy", "matte", "cracked", "wrinkled", "grainy", "speckled", "porous",
                "fuzzy", "furry", "scaly", "hairy", "feathery", "velvety", "rusty", "mossy", "crumpled", "ribbed",
                "woven", "knitted", "quilted", "braided", "shiny", "slimy", "dusty", "pitted", "bubbly", "flaky",
                "corrugated", "sandy", "rocky", "fibrous", "spiky", "soft", "wet", "muddy", "icy", "peeling"]
    out = fill(["{a_t} pattern", "{a_t} design", "a repeating {t} pattern", "{a_t} pattern on fabric",
                "{a_t} wallpaper"], t=patterns)
    out += fill(["{a_t} texture", "{a_t} surface", "a close-up of {a_t} surface", "{a_t} material"], t=surfaces)
    out += fill(["{c} and {d} stripes", "{a_c} and {d} checkerboard", "{c} polka dots on {d}"],
                c=["red", "black", "blue", "yellow", "green"], d=["white", "black", "yellow"])
    fixed += ["a striped pattern", "a checkered pattern", "a polka dot pattern", "rough bark texture",
              "tree bark close-up", "peeling paint", "rippled sand", "cracked dry earth", "fish scales",
              "animal fur close-up", "knitted wool", "a brick wall texture", "wood grain", "marble veins",
              "water ripples", "a rusty metal surface", "bubble wrap", "corrugated cardboard", "honeycomb cells",
              "leather grain", "snake skin texture", "feathers close-up", "a stucco wall", "gravel texture",
              "frost on glass", "a woven basket texture", "fabric weave close-up", "crumpled paper", "a mossy stone",
              "cobblestone texture", "lichen on a rock", "a pile of sand", "sponge texture", "tangled threads",
              "moss on a log", "a cracked windshield", "foam bubbles", "salt crystals", "a shag carpet",
              "a tiled floor", "a patterned rug", "a lace tablecloth", "dried mud texture", "a knitted sweater",
              "a chain link fence", "raindrops on a window", "a spider web"]
    return 220, out, fixed


def materials():
    fixed = []
    mats = ["wood", "metal", "glass", "fabric", "stone", "plastic", "paper", "cardboard", "leather", "rubber",
            "ceramic", "concrete", "brick", "marble", "steel", "copper", "brass", "gold", "silver", "aluminum",
            "wool", "cotton", "silk", "denim", "bamboo", "wicker", "clay", "porcelain", "granite", "ice", "foam",
            "cork", "velvet", "linen", "tin", "iron", "crystal", "straw", "wax", "sandstone"]
    out = fill(["something made of {m}", "an object made of {m}", "{a_m} surface", "a close-up of {m}",
                "a photo of {m}", "a texture of {m}", "a piece of {m}", "made of {m}"], m=mats)
    pairs = {
        "wooden": ["table", "chair", "spoon", "box", "fence", "door", "floor", "bowl", "toy", "boat", "bench"],
        "metal": ["bucket", "gate", "pipe", "box", "chair", "spoon", "can", "railing", "roof", "sculpture"],
        "glass": ["bottle", "vase", "window", "jar", "cup", "bowl", "door", "building", "table", "marble"],
        "plastic": ["bottle", "bag", "toy", "chair", "box", "cup", "bucket", "container", "fork", "bin"],
        "stone": ["wall", "bridge", "house", "statue", "path", "bench", "stairs", "tower", "fountain"],
        "paper": ["bag", "cup", "airplane", "lantern", "boat", "crane", "envelope", "map", "napkin"],
        "leather": ["bag", "jacket", "shoe", "belt", "wallet", "sofa", "boot", "glove", "saddle"],
        "ceramic": ["mug", "plate", "vase", "bowl", "pot", "tile", "teapot", "figurine"],
        "woolen": ["sweater", "scarf", "blanket", "hat", "sock", "mitten"],
        "rubber": ["ball", "boot", "tire", "duck", "glove", "band"],
        "brick": ["wall", "house", "chimney", "building", "path", "oven"],
        "silk": ["scarf", "dress", "shirt", "ribbon", "tie", "curtain"],
        "cardboard": ["box", "tube", "sign", "cutout"],
        "concrete": ["wall", "building", "floor", "bridge", "pillar", "staircase"],
        "golden": ["ring", "crown", "coin", "necklace", "trophy", "statue"],
        "copper": ["pot", "kettle", "pipe", "wire", "roof"],
        "wicker": ["basket", "chair", "lamp", "table"],
        "marble": ["statue", "floor", "countertop", "column", "staircase"],
    }
    out += [art(f"{m} {o}") for m, objs in pairs.items() for o in objs]
    fixed += ["shiny metal", "polished wood", "broken glass", "torn paper", "folded fabric", "rusty iron",
              "soft cotton", "smooth plastic", "rough stone", "transparent glass", "reflective metal",
              "a pile of bricks", "a stack of paper", "a roll of fabric", "a sheet of metal", "stacked wooden planks",
              "a pane of glass", "a block of ice", "a lump of clay", "a ball of wool", "a bundle of straw",
              "a chunk of marble", "scrap metal", "recycled plastic", "bare concrete", "woven fabric"]
    return 220, out, fixed


def shapes():
    fixed = []
    shp = ["circle", "square", "triangle", "star", "cross", "spiral", "rectangle", "hexagon", "oval", "diamond",
           "heart", "arrow", "crescent", "pentagon", "octagon", "ring", "cube", "sphere", "cone", "cylinder",
           "pyramid", "arch", "dot", "zigzag line", "wavy line", "straight line", "curved line", "ellipse"]
    plural = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
              "cross": "crosses", "spiral": "spirals", "rectangle": "rectangles", "hexagon": "hexagons",
              "dot": "dots", "ring": "rings", "arrow": "arrows", "heart": "hearts",
              "diamond": "diamonds", "cube": "cubes", "sphere": "spheres"}
    out = fill(["{a_s}", "{a_s} shape", "a drawing of {a_s}", "a large {s}", "a small {s}",
                "{a_s} on a white background", "{a_s} outline", "{a_s} symbol", "a simple {s}", "a filled {s}",
                "a photo of {a_s}", "a thin {s}", "a bold {s}"], s=shp)
    out += fill(["{a_c} {s}"], c=MAIN_COLOURS, s=["circle", "square", "triangle", "star", "cross", "spiral",
                                                  "heart", "hexagon", "diamond", "ring", "arrow"])
    out += fill(["many {p}", "two {p}", "a row of {p}", "a pattern of {p}", "scattered {p}", "overlapping {p}"],
                p=sorted(plural.values()))
    fixed += ["a circle", "a square", "a triangle", "a star", "a cross", "a spiral", "a photo of a star",
              "a straight line", "concentric circles", "parallel lines", "diagonal lines", "vertical lines",
              "horizontal lines", "crossed lines", "a circle inside a square", "a triangle pointing up",
              "a triangle pointing down", "a five pointed star", "a cross symbol", "a plus sign", "a spiral shell",
              "a spiral galaxy", "a round object", "a square object", "a triangular object", "a star shaped object",
              "a cross shaped object", "a rectangular object", "a curved shape", "sharp angles", "rounded corners",
              "a symmetric shape", "an irregular shape", "a geometric shape", "an abstract shape",
              "a star in the sky", "a red cross", "a circular window", "a square tile", "a triangular sign",
              "a round table", "a square box", "a spiral staircase", "a checkmark", "an x mark", "a crescent moon",
              "a ring of stones", "a circle of people", "a line of trees", "a straight road", "a winding road"]
    return 220, out, fixed


def objects():
    fixed = []
    household = ["cup", "mug", "plate", "bowl", "kettle", "lamp", "clock", "pillow", "blanket", "vase", "candle",
                 "mirror", "towel", "bucket", "key", "umbrella", "book", "phone", "laptop", "television",
                 "remote control", "toothbrush", "pair of scissors", "broom", "backpack", "bottle", "spoon",
                 "fork", "knife", "teapot", "basket", "suitcase", "wallet", "pair of glasses", "wristwatch",
                 "shoe", "hat", "camera", "light bulb", "frying pan", "toaster", "microwave", "refrigerator",
                 "washing machine", "keyboard", "computer mouse", "pen", "pencil", "envelope", "trash can"]
    tools = ["hammer", "screwdriver", "wrench", "saw", "drill", "shovel", "rake", "axe", "pair of pliers",
             "tape measure", "paintbrush", "ladder", "wheelbarrow", "toolbox", "garden hose", "chainsaw",
             "flashlight", "crowbar", "sewing machine", "magnifying glass", "padlock", "rope"]
    vehicles = ["car", "bus", "truck", "bicycle", "motorcycle", "train", "airplane", "sailboat", "helicopter",
                "tractor", "taxi", "scooter", "ambulance", "fire truck", "canoe", "ship", "van", "tram",
                "hot air balloon", "skateboard", "police car", "school bus", "jeep", "kayak", "speedboat",
                "rowboat", "cargo ship", "race car", "pickup truck", "forklift"]
    food = ["apple", "banana", "orange", "strawberry", "pizza", "burger", "sandwich", "cake", "loaf of bread",
            "wedge of cheese", "salad", "bowl of soup", "plate of pasta", "plate of sushi", "boiled egg", "carrot",
            "tomato", "head of broccoli", "bunch of grapes", "watermelon", "lemon", "donut", "cookie",
            "ice cream cone", "bowl of rice", "bowl of noodles", "steak", "pineapple", "corn cob", "mushroom",
            "pie", "chocolate bar", "hot dog", "croissant", "pancake", "cup of coffee", "glass of milk",
            "cupcake", "pear", "cherry", "peach", "coconut", "potato", "onion", "pumpkin"]
    furniture = ["chair", "table", "sofa", "bed", "desk", "bookshelf", "wardrobe", "stool", "bench", "armchair",
                 "cabinet", "dresser", "rocking chair", "crib", "coffee table", "dining table", "office chair",
                 "hammock", "bunk bed", "shelf"]
    instruments = ["guitar", "piano", "violin", "drum", "trumpet", "flute", "saxophone", "cello", "harp",
                   "accordion", "harmonica", "tuba", "banjo", "xylophone", "trombone", "electric guitar",
                   "drum kit", "grand piano", "clarinet", "ukulele"]
    clothing = ["dress", "shirt", "jacket", "scarf", "pair of boots", "pair of gloves", "sweater", "pair of jeans",
                "raincoat", "tie", "baseball cap", "pair of sneakers", "coat", "skirt", "sock"]
    toys_misc = ["teddy bear", "ball", "kite", "doll", "toy car", "puzzle", "balloon", "soccer ball",
                 "tennis racket", "baseball bat", "chess board", "pair of dice", "trophy", "flag", "traffic light",
                 "stop sign", "fire hydrant", "mailbox", "street lamp", "parking meter"]
    every = household + tools + vehicles + food + furniture + instruments + clothing + toys_misc
    out = fill(["a photo of {a_o}", "{a_o}", "a close-up of {a_o}", "a picture of {a_o}", "an old {o}",
                "a new {o}", "{a_o} on a white background"], o=every)
    out += fill(["{a_o} on a table", "{a_o} on a shelf", "a broken {o}", "{a_o} in a kitchen"], o=household)
    out += fill(["{a_o} on a workbench", "a rusty {o}", "{a_o} in a garage"], o=tools)
    out += fill(["{a_o} on the road", "a parked {o}", "a moving {o}", "{a_o} in traffic"],
                o=[v for v in vehicles if v not in ("sailboat", "canoe", "ship", "kayak", "speedboat", "rowboat",
                                                    "cargo ship", "airplane", "helicopter", "hot air balloon")])
    out += fill(["{a_o} on the water", "{a_o} in a harbor"],
                o=["sailboat", "canoe", "ship", "kayak", "speedboat", "rowboat", "cargo ship"])
    out += fill(["{a_o} in the sky", "{a_o} flying over a city"], o=["airplane", "helicopter", "hot air balloon"])
    out += fill(["{a_o} on a plate", "a fresh {o}", "a sliced {o}", "a delicious {o}"],
                o=["apple", "banana", "orange", "strawberry", "pizza", "burger", "sandwich", "cake", "tomato",
                   "watermelon", "lemon", "donut", "pineapple", "peach", "pear", "croissant", "steak"])
    out += fill(["someone playing {a_o}", "{a_o} on a stage"], o=instruments)
    out += fill(["{a_o} in a living room", "an empty {o}", "a wooden {o}"], o=furniture)
    out += fill(["{a_o} on a hanger", "a folded {o}"], o=clothing)
    fixed += ["household items", "a set of tools", "kitchen utensils", "a musical instrument", "a piece of furniture",
              "fresh fruit", "a plate of food", "a bowl of fruit", "vegetables", "a vehicle", "traffic on a road",
              "a messy desk", "a pile of clothes", "a stack of books", "toys on the floor", "groceries in a bag",
              "a cluttered kitchen counter", "a set table"]
    return 400, out, fixed


def animals():
    fixed = []
    mammals = ["dog", "cat", "horse", "cow", "sheep", "pig", "goat", "lion", "tiger", "elephant", "giraffe", "zebra",
               "bear", "wolf", "fox", "deer", "rabbit", "squirrel", "mouse", "monkey", "gorilla", "kangaroo",
               "camel", "panda", "koala", "hippo", "rhino", "bat", "otter", "raccoon", "hedgehog", "moose",
               "leopard", "cheetah", "buffalo", "donkey", "polar bear", "puppy", "kitten", "hamster"]
    water_birds = ["duck", "swan", "goose", "pelican", "flamingo", "heron", "seagull", "penguin", "cormorant",
                   "puffin", "loon", "albatross", "kingfisher", "egret", "mallard", "grebe", "sandpiper", "tern"]
    land_birds = ["sparrow", "robin", "crow", "eagle", "hawk", "owl", "parrot", "pigeon", "woodpecker",
                  "hummingbird", "peacock", "chicken", "turkey", "ostrich", "cardinal", "blue jay", "finch",
                  "vulture", "falcon", "rooster", "wren", "magpie", "canary", "warbler", "toucan", "quail"]
    fish = ["goldfish", "salmon", "shark", "tuna", "trout", "clownfish", "eel", "catfish", "stingray", "swordfish",
            "pufferfish", "carp", "koi fish", "piranha", "angelfish", "tropical fish"]
    sea = ["whale", "dolphin", "octopus", "crab", "jellyfish", "starfish", "seal", "sea lion", "lobster", "shrimp"]
    insects = ["bee", "butterfly", "ant", "beetle", "ladybug", "dragonfly", "grasshopper", "mosquito", "fly",
               "moth", "wasp", "cricket", "caterpillar", "firefly", "spider", "snail", "scorpion", "centipede"]
    reptiles = ["snake", "lizard", "turtle", "crocodile", "alligator", "iguana", "chameleon", "gecko", "tortoise",
                "frog", "toad", "salamander", "cobra", "python", "komodo dragon", "sea turtle"]
    everyone = mammals + water_birds + land_birds + fish + sea + insects + reptiles
    out = fill(["a photo of {a_x}", "{a_x} in the wild", "a close-up of {a_x}"], x=everyone)
    out += fill(["{a_x} running", "{a_x} sleeping", "{a_x} in a field", "a baby {x}", "{a_x} eating",
                 "{a_x} lying on the grass", "a portrait of {a_x}"], x=mammals)
    out += fill(["{a_x} swimming on a lake", "{a_x} standing in water", "{a_x} on the shore", "{a_x} flying",
                 "{a_x} on water", "{a_x} by the sea", "{a_x} diving into water"], x=water_birds)
    out += fill(["{a_x} perched on a branch", "{a_x} flying", "{a_x} on the ground", "{a_x} in a tree",
                 "{a_x} on land", "{a_x} in a forest"], x=land_birds)
    out += fill(["{a_x} underwater", "{a_x} in an aquarium", "{a_x} swimming", "a school of {x}"],
                x=fish)
    out += fill(["{a_x} in the ocean", "{a_x} underwater", "{a_x} on a beach"], x=sea)
    out += fill(["{a_x} on a flower", "{a_x} on a leaf", "a macro photo of {a_x}"], x=insects)
    out += fill(["{a_x} on a rock", "{a_x} in the grass", "{a_x} basking in the sun"], x=reptiles)
    fixed += ["a photo of a cat", "a photo of a dog", "a water bird", "a land bird", "a bird in flight",
              "a flock of birds", "a herd of cattle", "a pack of wolves", "a swarm of bees", "a school of fish",
              "birds on a wire", "a bird nest with eggs", "a waterbird on a pond", "a seabird over the ocean",
              "a songbird in a bush", "a bird of prey", "a wild animal", "a pet", "a farm animal", "a sea creature",
              "an insect", "a reptile", "a mammal", "a bird", "a fish", "an amphibian", "animal tracks in snow",
              "a dog and a cat", "a horse and rider", "a cat on a sofa", "a dog on a leash", "a dog playing fetch",
              "a cat looking out a window", "cows grazing in a meadow", "sheep on a hillside"]
    return 420, out, fixed


def people():
    fixed = []
    subj = ["a man", "a woman", "a child", "a boy", "a girl", "a baby", "an old man", "an old woman",
            "a teenager", "a young woman", "a young man", "a family", "a couple", "a group of friends", "a soldier",
            "a doctor", "a chef", "a farmer", "a police officer", "a firefighter", "an athlete", "a student",
            "a teacher", "a worker", "a dancer", "a musician", "a tourist", "a businessman"]
    acts = ["smiling", "running", "walking", "sitting", "laughing", "reading a book", "cooking", "swimming",
            "riding a bicycle", "talking on the phone", "playing soccer", "holding an umbrella", "waving",
            "sleeping", "eating", "dancing", "singing", "working at a desk", "crying", "jumping", "standing",
            "looking at the camera", "hiking", "taking a photo", "drinking coffee", "shopping", "painting",
            "climbing", "driving a car", "hugging"]
    out = fill(["{p} {x}"], p=subj, x=acts)
    out += [f"a portrait of {p}" for p in subj]
    fixed += ["a woman smiling", "a man running", "a crowd", "children playing", "a crowd of people",
              "people at a market", "hands holding a cup", "a close-up of a face", "a face in profile",
              "a smiling face", "a person", "a group of people", "people walking on a street", "a crowd at a concert",
              "a team of players", "a wedding party", "a person from behind", "a silhouette of a person", "a hand",
              "two hands", "bare feet", "a person wearing a hat", "a person wearing glasses",
              "a person in a red coat", "a masked face", "people waiting in line", "an audience in a theater",
              "a busy sidewalk", "kids in a classroom", "a mother and child", "a father and son",
              "grandparents with grandchildren", "twins", "a person with long hair", "a bald man", "a bearded man",
              "a woman with curly hair", "a man in a suit", "a woman in a dress", "a child in a costume",
              "a person in a wheelchair", "people on a beach", "skiers on a slope", "surfers in the waves",
              "runners in a marathon"]
    return 240, out, fixed


def places():
    fixed = []
    out = fill(["a photo of {a_p}", "a view of {a_p}", "{a_p} scene", "an empty {p}", "{a_p}",
                "a quiet {p}", "a wide shot of {a_p}"], p=PLACES)
    out += fill(["a crowded {p}", "a busy {p}"],
                p=["city street", "beach", "market", "train station", "restaurant", "park", "airport terminal",
                   "subway platform", "supermarket", "stadium", "office", "classroom"])
    fixed += ["a beach", "a forest", "the ocean", "a lake", "a river", "a desert", "the mountains", "a city street",
              "a kitchen", "an office", "a farm", "a bamboo forest", "a grass field", "open water", "dry land",
              "a body of water", "the surface of the water", "calm water", "a rough sea", "a shoreline",
              "a grassy field", "a dirt road", "a sandy beach", "deep blue water", "a lake surrounded by trees",
              "a river through a forest", "waves on the ocean", "a distant horizon", "rolling hills",
              "a mountain peak", "sand dunes", "a field of sunflowers", "a bamboo grove", "a dense forest",
              "a tropical beach with palm trees", "a city skyline", "tall skyscrapers", "a suburban neighborhood",
              "a country road", "a farmhouse", "a barn", "a fence around a field", "a background of water",
              "a background of land", "a land background", "a water background", "green grass", "bare land",
              "flooded land", "land and water", "a coastline from above", "a rocky shore", "a muddy riverbank",
              "a frozen lake", "a stream in the woods", "a cornfield", "a lawn", "a backyard", "a front porch",
              "a hallway", "a staircase", "a doorway", "an attic", "a basement", "a gym", "a swimming pool",
              "a tennis court", "a soccer field", "a golf course", "a ski slope", "a train track", "a bus stop",
              "a gas station", "a construction site", "an amusement park", "a zoo", "an aquarium", "a museum",
              "a shopping mall", "a cafe", "a bakery", "a laboratory", "a server room", "a greenhouse",
              "a lighthouse on a cliff", "a harbor with boats", "a marina", "a dam", "a windmill",
              "a fountain in a square", "a cemetery", "a ruin", "a palace"]
    return 300, out, fixed


def weather():
    fixed = []
    places_ = OUTDOOR
    out = fill(["{a_p} in the rain", "{a_p} covered in snow", "a foggy {p}", "a stormy {p}", "a sunny {p}",
                "{a_p} under a cloudy sky", "a misty {p}", "a windy {p}", "a snowy {p}", "{a_p} after rain"],
               p=places_)
    fixed += ["rain falling", "falling snow", "a storm", "a sunny day", "a rainy day", "heavy rain", "light rain",
              "a snowy street", "storm clouds over the sea", "a thunderstorm", "a lightning strike",
              "a rainbow in the sky", "a blizzard", "thick fog", "morning mist", "an overcast sky",
              "a clear blue sky", "a sunny day", "a cloudy day", "a windy day", "hail", "frost on the grass",
              "a tornado", "a hurricane", "dark storm clouds", "snowflakes falling", "raindrops on a leaf",
              "puddles on the road", "a flooded street", "a heat wave", "drought", "icicles hanging from a roof",
              "a snowstorm", "drizzle", "a foggy morning", "fluffy white clouds", "a dust storm",
              "a sandstorm in the desert", "sunshine", "bright sunlight", "a gray sky", "wet pavement",
              "an umbrella in the rain", "people in the snow", "a snowman", "deep snow", "autumn leaves in the wind",
              "a summer day", "a winter scene", "a spring day", "an autumn day", "a dramatic sky", "cumulus clouds",
              "a gloomy day"]
    return 200, out, fixed


def times():
    fixed = []
    out = fill(["{a_p} at sunset", "{a_p} at night", "{a_p} at dawn", "{a_p} at dusk", "{a_p} at sunrise",
                "{a_p} in the morning", "{a_p} at noon", "{a_p} in the evening"], p=OUTDOOR)
    fixed += ["a sunset", "a city at night", "the sky at dawn", "sunlight through trees", "sunlight through a window",
              "a sunset over the ocean", "city lights at night", "a starry night sky", "the moon at night",
              "morning light", "golden hour", "blue hour", "twilight", "midnight", "a sunrise over mountains",
              "the night sky", "a full moon", "the milky way", "a dark night", "early morning", "late afternoon",
              "a red sunset", "an orange sky at dusk", "street lamps at night", "a moonlit lake", "dawn light",
              "long shadows in the evening", "a bright midday sun", "a sunset silhouette", "fireworks at night",
              "neon signs at night", "a lit window at night", "a candle in the dark", "the sun on the horizon",
              "a pink sky at dawn", "a night scene", "a daytime scene", "a scene at twilight", "the setting sun",
              "the rising sun", "a crescent moon at dusk", "stars above a mountain", "nighttime traffic"]
    return 170, out, fixed


def art_styles():
    fixed = []
    styles = ["a watercolor painting", "a pencil sketch", "a cartoon", "pixel art", "an oil painting", "a mosaic",
              "a charcoal drawing", "an ink drawing", "a comic book drawing", "an anime drawing", "digital art",
              "a 3d render", "an origami model", "a stained glass window", "graffiti", "an embroidery",
              "a woodcut print", "pop art", "an impressionist painting", "an abstract painting", "a line drawing",
              "a drawing by a child", "a crayon drawing", "a pastel drawing", "a collage", "low poly art",
              "a vector illustration", "a clay sculpture", "a marble statue", "a tattoo", "a mural", "a sticker",
              "a chalk drawing", "a blueprint", "a linocut", "a sketch", "a painting", "a drawing",
              "a cross stitch", "a tapestry", "a bronze sculpture", "a paper cutout", "a doodle",
              "an engraving", "a silhouette drawing", "a poster", "a storybook illustration"]
    out = [f"{s} of {art(x)}" for s in styles for x in SUBJECTS]
    fixed += styles
    out += [f"{s} style" for s in ["watercolor", "cartoon", "pixel art", "anime", "comic", "sketch", "pop art",
                                   "impressionist", "cubist", "surrealist", "minimalist", "art deco", "baroque",
                                   "renaissance", "abstract", "ukiyo-e", "psychedelic", "retro", "gothic",
                                   "realist", "folk art", "graphic novel", "sumi-e", "vaporwave"]]
    fixed += ["an emoji", "a logo", "an icon", "a cartoon character", "a video game screenshot", "a diagram",
              "a chart", "a map", "a handwritten note", "printed text", "a page of text", "a comic strip",
              "a painting in a museum", "brush strokes", "paint splatters", "a canvas", "an art gallery",
              "a sculpture in a park", "a hand drawn illustration", "a picture book illustration"]
    return 220, out, fixed


def photo_properties():
    fixed = []
    adjs = ["blurry", "overexposed", "underexposed", "grainy", "noisy", "pixelated", "low resolution",
            "high resolution", "black and white", "sepia", "vintage", "dark", "bright", "cropped", "tilted",
            "out of focus", "high contrast", "low contrast", "washed out", "saturated", "faded", "low quality",
            "high quality", "jpeg compressed", "soft focus", "long exposure", "wide angle", "fisheye",
            "infrared", "professional", "amateur", "blurred", "sharp", "distorted", "shaky", "hazy"]
    views = ["a close-up", "an aerial view", "a macro shot", "a side view", "a top-down view", "a view from below",
             "a silhouette", "a panorama", "a selfie", "a snapshot", "a reflection", "a rear view",
             "a view from above", "a front view", "a distant view", "a zoomed in photo", "a wide shot",
             "a thermal image", "an x-ray image", "a satellite image", "a security camera image",
             "a night vision image", "a cropped photo", "a polaroid photo", "a film photo", "a screenshot",
             "a scanned photo", "a photo through a window", "a mirror image", "an upside down photo"]
    out = fill(["{a_q} photo", "{a_q} photo of {a_s}", "{a_q} image", "{a_q} picture"],
               q=adjs, s=SUBJECTS)
    out += [f"{v} of {art(s)}" for v in views for s in SUBJECTS]
    out += views
    fixed += ["a blurry photo", "a close-up", "an aerial view", "a black and white photo", "an overexposed photo",
              "a low resolution photo", "a wide angle photo", "motion blur", "shallow depth of field",
              "a blurred background", "lens flare", "a vignette", "a tilted horizon", "camera shake", "harsh shadows",
              "soft light", "backlit", "low light", "dim lighting", "a flash photo", "studio lighting",
              "natural light", "a photo with heavy noise", "a photo with a watermark", "a photo with text",
              "a double exposure", "chromatic aberration", "a bokeh background", "an empty frame", "a blank image",
              "a plain white image", "a plain black image", "a photo in portrait orientation",
              "a photo in landscape orientation", "a photo with a border"]
    return 220, out, fixed


def counts():
    fixed = []
    nouns = [("dog", "dogs"), ("cat", "cats"), ("cup", "cups"), ("tree", "trees"), ("bird", "birds"),
             ("car", "cars"), ("apple", "apples"), ("person", "people"), ("chair", "chairs"),
             ("flower", "flowers"), ("book", "books"), ("boat", "boats"), ("balloon", "balloons"), ("egg", "eggs"),
             ("horse", "horses"), ("bottle", "bottles"), ("candle", "candles"), ("coin", "coins"),
             ("child", "children"), ("house", "houses"), ("duck", "ducks"), ("cow", "cows"), ("ball", "balls"),
             ("window", "windows"), ("star", "stars"), ("key", "keys"), ("shoe", "shoes"), ("plate", "plates")]
    nums = ["two", "three", "four", "five", "six", "seven", "ten", "several", "many", "a few", "a pair of",
            "a group of", "a dozen", "hundreds of", "lots of", "a row of", "a pile of", "countless", "dozens of"]
    out = [f"{n} {p}" for n in nums for _, p in nouns]
    out += [f"a photo of {n} {p}" for n in ["two", "three", "four", "five", "many"] for _, p in nouns]
    out += [f"{x} {s}" for x in ["a single", "one", "a lone", "only one"] for s, _ in nouns]
    out += [f"a photo of a single {s}" for s, _ in nouns]
    fixed += ["two dogs", "three cups", "a single tree", "many birds", "an empty room", "no people", "nobody",
              "nothing in the frame", "a lone tree", "a single tree", "one person alone", "a crowd of many people",
              "two of the same", "a pair", "a couple of things", "a large number of objects", "a few objects",
              "many small objects", "one large object", "two objects side by side", "three objects in a row",
              "a single object", "a group of objects", "a collection of items", "one of each", "a handful of coins",
              "a flock of many birds"]
    return 190, out, fixed


def spatial():
    fixed = []
    things = ["object", "tree", "person", "car", "bird", "ball", "cup", "dog", "red object", "white object",
              "small object", "large object", "boat", "house", "bright spot", "dark shape"]
    pos = ["on the left", "on the right", "at the top of the image", "at the bottom of the image", "in the center",
           "in the top left corner", "in the top right corner", "in the bottom left corner",
           "in the bottom right corner", "near the edge", "in the foreground", "in the background",
           "on the left side", "on the right side", "in the middle", "far away", "close to the camera",
           "at the top", "at the bottom", "in the corner", "near the top", "near the bottom",
           "off center", "at the edge of the frame"]
    out = [f"{art(t)} {p}" for t in things for p in pos]
    out += [f"something {p}" for p in pos]
    out += [f"a large object {p}" for p in ["in the center", "filling the frame"]]
    rel = [("cat", "table"), ("cup", "plate"), ("ball", "chair"), ("bird", "tree"), ("lamp", "bed"),
           ("dog", "fence"), ("book", "shelf"), ("car", "house"), ("boat", "bridge"), ("person", "door"),
           ("vase", "window"), ("bag", "bench")]
    preps = ["on", "next to", "under", "above", "behind", "in front of", "beside", "near"]
    out += [f"{art(x)} {p} {art(y)}" for x, y in rel for p in preps]
    fixed += ["an object on the left", "an object on the right", "something at the top of the image",
              "something at the bottom of the image", "an object in the bottom right corner",
              "an object in the top left corner", "a large object in the center", "an object between two trees",
              "objects stacked on top of each other", "a centered composition", "an object in the lower half",
              "an object in the upper half", "the left half of the image", "the right half of the image",
              "an object partly out of frame", "a symmetric composition", "a tiny object in a large space",
              "an object seen from far away", "one object behind another", "objects arranged in a circle",
              "objects lined up in a row", "a cluttered scene", "a sparse scene", "empty space on the right",
              "empty space on the left", "a horizon line in the middle", "a small object near the edge"]
    return 200, out, fixed


CATEGORIES = [("colours", colours), ("textures", textures), ("materials", materials), ("shapes", shapes),
              ("objects", objects), ("animals", animals), ("people", people), ("places", places),
              ("weather", weather), ("times_of_day", times), ("art_styles", art_styles),
              ("photo_properties", photo_properties), ("counts", counts), ("spatial", spatial)]


def clean(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".,;:!?").split())


def general_bank():
    """Per category: its hand-written phrases, then a fixed-seed sample of its combinations up to the quota."""
    rng = random.Random(SEED)
    taken, blocks = set(), []
    for name, make in CATEGORIES:
        quota, combos, fixed = make()

        def usable(texts):
            return sorted({c for c in map(clean, texts) if MIN_WORDS <= len(c.split()) <= MAX_WORDS
                           and c not in taken})

        chosen = usable(fixed)
        taken.update(chosen)
        pool = usable(combos)
        rng.shuffle(pool)
        chosen = sorted(chosen + pool[:max(0, quota - len(chosen))])
        if len(chosen) < quota:
            print(f"warning: {name}: {len(chosen)} texts, quota {quota}", file=sys.stderr)
        taken.update(chosen)
        blocks.append((name, chosen))
    return blocks


# --------------------------------------------------------------------------------------------------------------------
# the shapes world (its tokenizer knows only these words)

SHAPES_VOCAB = ["a", "an", "the", "photo", "image", "picture", "of", "in", "on", "and", "object", "shape", "there",
                "is", "circle", "square", "triangle", "star", "cross", "red", "orange", "yellow", "purple", "white",
                "pink", "small", "large", "left", "right", "top", "bottom", "water", "land"]
W_SHAPES = ["circle", "square", "triangle", "star", "cross"]
W_COLOURS = ["red", "orange", "yellow", "purple", "white", "pink"]
W_SIZES = ["small", "large"]
W_VERT, W_HORIZ = ["top", "bottom"], ["left", "right"]
W_BACKGROUNDS = ["water", "land"]
W_POSITIONS = ([f"in the {v}" for v in W_VERT] + [f"in the {h}" for h in W_HORIZ]
               + [f"in the {v} {h}" for v in W_VERT for h in W_HORIZ])


def shapes_bank():
    out = []
    # one attribute, several framings
    out += fill(["{a_s}", "the {s}", "a photo of {a_s}", "an image of {a_s}", "a picture of {a_s}", "there is {a_s}",
                 "{a_s} shape"], s=W_SHAPES)
    out += fill(["{a_c} object", "{a_c} shape", "a photo of {a_c} object", "an image of {a_c} object",
                 "a picture of {a_c} shape", "there is {a_c} object"], c=W_COLOURS)
    out += fill(["a {z} object", "a {z} shape", "a photo of a {z} object", "there is a {z} object"], z=W_SIZES)
    out += fill(["an object {p}", "a shape {p}", "a photo of an object {p}", "there is an object {p}"],
                p=W_POSITIONS)
    out += fill(["an object on the {h}"], h=W_HORIZ)
    out += fill(["an object on {b}", "a shape on {b}", "a photo of {b}", "an image of {b}", "a picture of {b}",
                 "a photo of an object on {b}", "there is an object on {b}", "{b}"], b=W_BACKGROUNDS)
    out += ["water and land"]
    # pairs of attributes
    out += fill(["{a_c} {s}"], c=W_COLOURS, s=W_SHAPES)
    out += fill(["a {z} {s}"], z=W_SIZES, s=W_SHAPES)
    out += fill(["{a_s} on {b}"], s=W_SHAPES, b=W_BACKGROUNDS)
    out += fill(["{a_s} in the {v}", "{a_s} in the {h}"], s=W_SHAPES, v=W_VERT, h=W_HORIZ)
    out += fill(["{a_c} object on {b}"], c=W_COLOURS, b=W_BACKGROUNDS)
    out += fill(["{a_c} object in the {v}", "{a_c} object in the {h}"], c=W_COLOURS, v=W_VERT, h=W_HORIZ)
    out += fill(["a {z} {c} object"], z=W_SIZES, c=W_COLOURS)
    out += fill(["a {z} object on {b}"], z=W_SIZES, b=W_BACKGROUNDS)
    out += fill(["a {z} object in the {v}", "a {z} object in the {h}"], z=W_SIZES, v=W_VERT, h=W_HORIZ)
    out += fill(["an object in the {v} on {b}"], v=W_VERT, b=W_BACKGROUNDS)
    # a few full captions
    rng = random.Random(SEED)
    full = set()
    while len(full) < 8:
        z, c, s = rng.choice(W_SIZES), rng.choice(W_COLOURS), rng.choice(W_SHAPES)
        v, h, b = rng.choice(W_VERT), rng.choice(W_HORIZ), rng.choice(W_BACKGROUNDS)
        frame = rng.choice(["{}", "a photo of {}", "an image of {}", "a picture of {}"])
        full.add(frame.format(f"a {z} {c} {s} in the {v} {h} on {b}"))
    out += sorted(full)
    out += ["a small circle and a large square", "a red star and a white cross", "a triangle and a circle on water",
            "a square in the top left and a star in the bottom right"]
    # distractors / neutral phrases
    out += ["a photo", "an image", "a picture", "the photo", "the image", "the picture", "an object", "a shape",
            "the object", "the shape", "a photo of an object", "an image of an object", "a picture of an object",
            "a photo of a shape", "an image of a shape", "a picture of a shape", "there is an object",
            "there is a shape", "a photo of the object", "an image of the shape", "an object and a shape"]
    seen, bank = set(), []
    for t in out:
        t = " ".join(t.split())
        if t not in seen:
            seen.add(t)
            bank.append(t)
    return bank


# --------------------------------------------------------------------------------------------------------------------
# templates

TEMPLATES = ["a photo of a {}", "a blurry photo of the {}", "a drawing of a {}", "a close-up photo of a {}",
             "a picture of a {}", "an image showing a {}", "a snapshot of a {}", "a {} in a photo",
             "a dimly lit photo of a {}", "a sunlit photo of the {}", "a grainy picture of a {}",
             "a small {} in a photo", "a large {} filling the frame", "a {} seen from a distance",
             "a {} seen from above", "a watercolor of a {}", "a pencil drawing of the {}", "a cartoon of a {}",
             "a 3d model of a {}", "a plush toy {}", "a {} made of clay", "a photo of a {} outdoors",
             "a photo of a {} indoors", "a cropped picture of the {}", "an old photograph of a {}",
             "a phone photo of a {}", "a {} in its natural setting", "a black and white picture of a {}"]
SHAPES_TEMPLATES = ["a {}", "a photo of a {}", "an image of a {}", "a picture of a {}"]


def write(name: str, lines) -> None:
    (HERE / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def check(name, lines, vocab=None, template=False):
    assert lines and all(lines), name
    assert len(set(lines)) == len(lines), f"{name}: duplicates"
    for t in lines:
        assert t == t.strip() and t == t.lower() and t[-1] not in ".,;:!?", (name, t)
        if vocab is not None:
            unknown = [w for w in t.replace("{}", " ").split() if w not in vocab]
            assert not unknown, (name, t, unknown)
        if template:
            assert t.count("{}") == 1 and t.count("{") == 1 and t.count("}") == 1, (name, t)


def main() -> None:
    blocks = general_bank()
    general = [t for _, texts in blocks for t in texts]
    for t in general:
        assert MIN_WORDS <= len(t.split()) <= MAX_WORDS, t
    check("general", general)
    shapes_ = shapes_bank()
    check("shapes", shapes_, vocab=set(SHAPES_VOCAB))
    assert all(len(t.split()) <= 14 for t in shapes_)
    check("templates", TEMPLATES, template=True)
    check("shapes_templates", SHAPES_TEMPLATES, vocab=set(SHAPES_VOCAB), template=True)
    write("general.txt", general)
    write("shapes.txt", shapes_)
    write("templates.txt", TEMPLATES)
    write("shapes_templates.txt", SHAPES_TEMPLATES)
    for name, texts in blocks:
        print(f"general/{name}: {len(texts)}")
    print(f"general.txt: {len(general)}\nshapes.txt: {len(shapes_)}\ntemplates.txt: {len(TEMPLATES)}\n"
          f"shapes_templates.txt: {len(SHAPES_TEMPLATES)}")


if __name__ == "__main__":
    main()
