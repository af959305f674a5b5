"""Write textspan's text banks from our own word lists (deterministic; run from anywhere).

    python text_banks/build_banks.py

general.txt      short image descriptions over many visual concepts (for natural-image CLIP models)
shapes.txt       phrases over the shapes world's vocabulary (for the built-in model)
templates.txt    zero-shot prompt templates for natural images ("{}" = the class name)
shapes_templates.txt  the same for the shapes world
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent

COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "gold",
           "silver", "beige", "turquoise", "navy blue", "dark green", "light blue", "bright red", "pale yellow",
           "crimson", "teal", "lavender", "maroon", "olive green", "magenta", "cream colored", "rust colored"]
COLOUR_FORMS = ["a {} object", "something {}", "a photo dominated by {}", "a {} background", "{} light",
                "a mostly {} image", "a {} surface"]
COLOUR_PAIRS = ["red and white", "black and white", "blue and yellow", "green and brown", "orange and blue",
                "pink and purple", "gold and black", "red and green", "gray and blue", "yellow and black",
                "white and gold", "brown and beige"]

TEXTURES = ["striped", "checkered", "polka dot", "spotted", "wavy", "zigzag", "dotted", "grainy", "smooth", "rough",
            "fuzzy", "furry", "scaly", "wrinkled", "cracked", "bumpy", "shiny", "glossy", "matte", "woven",
            "knitted", "honeycomb", "marbled", "speckled", "rusty", "mossy", "feathery", "ribbed", "quilted",
            "plaid", "paisley", "floral", "geometric", "mottled", "crumpled", "porous"]
TEXTURE_FORMS = ["a {} pattern", "a {} texture", "a close-up of a {} surface", "a {} fabric"]

MATERIALS = ["wood", "metal", "glass", "fabric", "stone", "plastic", "paper", "leather", "ceramic", "concrete",
             "brick", "steel", "copper", "marble", "rubber", "wool", "cotton", "silk", "clay", "sand", "ice",
             "bamboo", "cardboard", "porcelain", "granite", "denim", "straw", "velvet", "wax", "foam"]
MATERIAL_FORMS = ["an object made of {}", "a {} surface", "a pile of {}", "a close-up of {}"]

SHAPES = ["circle", "square", "triangle", "star", "cross", "spiral", "heart", "diamond", "hexagon", "oval",
          "rectangle", "crescent", "arrow", "ring", "cube", "sphere", "cone", "cylinder", "pyramid", "zigzag line",
          "curved line", "straight line", "grid", "dot"]
SHAPE_FORMS = ["a {}", "a {} shape", "a drawing of a {}", "a large {}", "a small {}"]

OBJECTS = ["chair", "table", "sofa", "bed", "lamp", "clock", "mirror", "vase", "cup", "mug", "plate", "bowl",
           "spoon", "fork", "knife", "bottle", "jar", "teapot", "kettle", "frying pan", "toaster", "microwave",
           "refrigerator", "washing machine", "television", "laptop", "keyboard", "computer mouse", "phone",
           "camera", "headphones", "radio", "remote control", "book", "notebook", "pencil", "pen", "scissors",
           "backpack", "suitcase", "umbrella", "hat", "shoe", "boot", "sock", "shirt", "dress", "jacket", "scarf",
           "glove", "watch", "necklace", "ring on a finger", "pair of glasses", "key", "lock", "door", "window",
           "staircase", "fence", "gate", "bench", "mailbox", "street lamp", "traffic light", "stop sign",
           "fire hydrant", "car", "bus", "truck", "bicycle", "motorcycle", "train", "tram", "airplane",
           "helicopter", "boat", "sailboat", "ship", "canoe", "tractor", "scooter", "skateboard", "surfboard",
           "kite", "balloon", "ball", "tennis racket", "baseball bat", "guitar", "piano", "violin", "drum",
           "trumpet", "flute", "microphone", "hammer", "screwdriver", "wrench", "saw", "shovel", "ladder",
           "bucket", "broom", "candle", "toothbrush", "towel", "pillow", "blanket", "basket", "box", "bag",
           "wallet", "coin", "banknote", "flag", "tent", "bridge", "tower", "lighthouse", "windmill", "fountain",
           "statue", "apple", "banana", "orange", "lemon", "strawberry", "grape", "watermelon", "pineapple",
           "tomato", "carrot", "potato", "onion", "broccoli", "mushroom", "corn", "pepper", "bread", "cake",
           "pizza", "sandwich", "hamburger", "hot dog", "salad", "soup", "pasta", "rice", "egg", "cheese",
           "cookie", "donut", "ice cream", "chocolate", "coffee", "tea", "glass of wine", "glass of water",
           "tree", "flower", "rose", "sunflower", "tulip", "cactus", "palm tree", "pine tree", "leaf", "bush",
           "potted plant", "rock", "log", "shell", "feather", "toy", "teddy bear", "doll", "puzzle", "chess board",
           "map", "painting on a wall", "poster", "sign", "calendar", "envelope", "gift box", "trophy"]
COLOURED_OBJECTS = ["car", "chair", "door", "cup", "shirt", "dress", "hat", "ball", "flower", "bird", "umbrella",
                    "balloon", "bicycle", "boat", "house", "book", "fish", "butterfly", "shoe", "bag"]
OBJECT_FORMS = ["a photo of a {}", "a {}", "a close-up of a {}", "a drawing of a {}"]

ANIMALS = ["dog", "puppy", "cat", "kitten", "horse", "cow", "pig", "sheep", "goat", "donkey", "rabbit", "mouse",
           "rat", "hamster", "squirrel", "fox", "wolf", "bear", "polar bear", "panda", "lion", "tiger", "leopard",
           "cheetah", "elephant", "giraffe", "zebra", "rhino", "hippo", "camel", "deer", "moose", "kangaroo",
           "koala", "monkey", "gorilla", "chimpanzee", "bat", "hedgehog", "raccoon", "otter", "beaver", "seal",
           "walrus", "dolphin", "whale", "shark", "fish", "goldfish", "salmon", "octopus", "jellyfish", "crab",
           "lobster", "starfish", "turtle", "tortoise", "frog", "snake", "lizard", "crocodile", "chameleon",
           "bird", "sparrow", "robin", "crow", "pigeon", "parrot", "owl", "eagle", "hawk", "falcon", "vulture",
           "hummingbird", "woodpecker", "flamingo", "peacock", "ostrich", "penguin", "duck", "goose", "swan",
           "pelican", "seagull", "heron", "stork", "albatross", "kingfisher", "cormorant", "chicken", "rooster",
           "turkey", "butterfly", "bee", "ant", "spider", "ladybug", "dragonfly", "beetle", "snail", "worm"]
ANIMAL_FORMS = ["a photo of a {}", "a {}", "a {} in the wild", "a close-up of a {}", "a cartoon {}"]
BIRD_PLACES = ["a water bird on a lake", "a water bird swimming", "a land bird on a branch", "a bird in a forest",
               "a bird on the beach", "a bird flying over the sea", "a bird standing in a marsh",
               "a bird perched on a fence", "a seabird on a rock", "a songbird in a tree", "ducks on a pond",
               "a bird in the grass", "a bird over the ocean", "a bird near a river", "a bird in a bamboo forest"]

PEOPLE = ["a man", "a woman", "a child", "a baby", "a teenager", "an old man", "an old woman", "a boy", "a girl",
          "a family", "a couple", "a group of friends", "a crowd of people", "a person walking", "a man running",
          "a woman smiling", "a child laughing", "a person sitting", "a person reading", "a person cooking",
          "a person dancing", "a person swimming", "a person riding a bicycle", "a person on a phone",
          "a soldier", "a doctor", "a nurse", "a chef", "a police officer", "a firefighter", "a farmer",
          "a teacher", "a student", "a musician", "a painter", "a scientist", "an athlete", "a football player",
          "a basketball player", "a tennis player", "a skier", "a surfer", "a climber", "a cyclist", "a runner",
          "a portrait of a man", "a portrait of a woman", "a face in profile", "a smiling face", "a sad face",
          "hands holding something", "a person wearing a hat", "a person with glasses", "a bearded man",
          "a woman with long hair", "people at a market", "people at a concert", "people on a beach",
          "a wedding", "a birthday party", "a person sleeping", "workers at a construction site",
          "a man in a suit", "a woman in a dress", "children playing", "a person with an umbrella"]

PLACES = ["beach", "forest", "ocean", "lake", "river", "desert", "mountain", "snowy mountain", "city street",
          "kitchen", "living room", "bedroom", "bathroom", "office", "classroom", "library", "farm", "barn",
          "bamboo forest", "grass field", "wheat field", "meadow", "jungle", "swamp", "marsh", "waterfall",
          "canyon", "cave", "volcano", "glacier", "island", "harbor", "port", "coast", "cliff", "valley", "hill",
          "park", "garden", "playground", "parking lot", "highway", "bridge over a river", "train station",
          "airport", "subway", "shopping mall", "supermarket", "restaurant", "cafe", "bar", "hotel lobby",
          "hospital", "church", "temple", "castle", "palace", "museum", "stadium", "gym", "swimming pool",
          "factory", "warehouse", "construction site", "skyscraper", "village", "small town", "suburb",
          "countryside", "vineyard", "orchard", "rice field", "lavender field", "pond", "creek", "tundra",
          "savanna", "rainforest", "coral reef", "underwater scene", "open sea", "sand dunes", "rocky shore",
          "alley", "rooftop", "market square", "campsite", "ski slope"]
PLACE_FORMS = ["a photo of a {}", "a view of a {}", "a {} scene"]
PLACE_PHRASES = ["water", "land", "an image with water", "an image on land", "a background of water",
                 "a background of land", "a landscape", "a seascape", "a cityscape", "an indoor scene",
                 "an outdoor scene", "nature", "an urban area", "a rural area", "the sky", "clouds in the sky",
                 "a blue sky", "a starry sky", "the horizon", "green grass", "dry ground", "muddy ground",
                 "a sandy ground", "a stone floor", "a wooden floor", "a tiled floor", "a brick wall"]

WEATHER = ["rain", "snow", "fog", "a storm", "sunshine", "hail", "wind", "a rainbow", "lightning", "mist",
           "clouds", "frost", "a heat wave", "a blizzard", "drizzle", "a thunderstorm", "a sandstorm", "haze"]
WEATHER_FORMS = ["a scene with {}", "a photo taken in {}", "{} outside"]
WEATHER_ADJ = ["a rainy day", "a snowy day", "a foggy morning", "a stormy sky", "a sunny day", "a cloudy day",
               "a windy day", "a cold winter day", "a hot summer day", "an autumn day", "a spring morning",
               "wet streets after rain", "snow covered trees", "frozen lake", "puddles on the ground"]

TIMES = ["sunset", "sunrise", "night", "dawn", "dusk", "noon", "midnight", "twilight", "the golden hour",
         "the blue hour", "early morning", "late afternoon", "evening"]
TIME_FORMS = ["a photo taken at {}", "a scene at {}", "a street at {}", "the sky at {}"]

ART = ["watercolor painting", "oil painting", "pencil sketch", "charcoal drawing", "ink drawing", "cartoon",
       "comic strip", "anime drawing", "pixel art", "mosaic", "stained glass", "graffiti", "poster design",
       "children's drawing", "digital art", "3d rendering", "low poly render", "vector illustration",
       "woodcut print", "linocut", "etching", "collage", "pop art", "impressionist painting",
       "abstract painting", "cubist painting", "surrealist painting", "minimalist design", "art deco design",
       "baroque painting", "renaissance painting", "ukiyo-e print", "chalk drawing", "crayon drawing",
       "sculpture", "origami", "embroidery", "tattoo design", "infographic", "blueprint", "technical drawing",
       "photograph", "old photograph", "polaroid photo", "screenshot", "video game scene", "logo", "icon",
       "emoji", "diagram"]
ART_FORMS = ["a {}", "a {} of a scene", "a {} of an animal", "a {} of a person"]

PHOTO = ["a blurry photo", "a sharp photo", "a close-up photo", "a macro photo", "an aerial view",
         "a view from above", "a view from below", "a wide angle photo", "a panoramic photo", "a black and white photo",
         "a sepia photo", "an overexposed photo", "an underexposed photo", "a dark photo", "a bright photo",
         "a low resolution photo", "a high resolution photo", "a pixelated image", "a noisy photo",
         "a grainy film photo", "a photo with motion blur", "a photo with shallow depth of field",
         "a photo with lens flare", "a photo with a vignette", "a cropped photo", "a tilted photo",
         "an upside down photo", "a mirrored image", "a photo with a watermark", "a photo with text on it",
         "a photo of a screen", "a reflection in a mirror", "a silhouette", "a shadow on a wall",
         "a long exposure photo", "a night photo with lights", "a photo taken with a flash",
         "a photo taken through a window", "a photo taken underwater", "a selfie", "a studio photo",
         "a product photo on a white background", "a photo with a plain background", "a cluttered scene",
         "an empty scene", "a symmetric composition", "a photo with high contrast", "a photo with low contrast",
         "a washed out photo", "a colorful photo", "a monochrome image", "a photo with warm colors",
         "a photo with cool colors", "a photo in soft light", "a photo in harsh light", "a backlit photo",
         "a photo of a photo", "a thumbnail image", "a snapshot", "a candid photo", "a posed photo",
         "a stock photo", "a security camera image", "a satellite image", "an x-ray image",
         "a microscope image", "a thermal image", "a scanned document"]

NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "ten", "a few", "many", "several", "dozens of"]
COUNT_NOUNS = ["dogs", "cats", "birds", "people", "cars", "trees", "flowers", "cups", "books", "apples", "chairs",
               "boats", "houses", "balls", "coins", "candles", "stars", "circles", "windows", "horses"]
SINGLE = ["a single tree", "a single person", "a single bird", "a single flower", "a lone boat", "a single car",
          "one object", "an empty room", "a pair of shoes", "a pair of hands", "a couple of birds",
          "a row of houses", "a stack of books", "a crowd", "a flock of birds", "a herd of cows",
          "a school of fish", "a bunch of bananas", "a pile of rocks", "a line of cars"]

POSITIONS = ["on the left", "on the right", "at the top", "at the bottom", "in the center", "in the top left corner",
             "in the top right corner", "in the bottom left corner", "in the bottom right corner",
             "near the edge", "in the foreground", "in the background", "in the middle"]
SPATIAL_FORMS = ["an object {}", "something {}", "a large object {}", "a small object {}", "a person {}",
                 "an animal {}"]
SPATIAL_EXTRA = ["two objects side by side", "one object above another", "an object behind another",
                 "an object in front of a wall", "objects in a row", "objects in a circle", "objects in a grid",
                 "a symmetric arrangement", "scattered objects", "overlapping objects", "an object inside a box",
                 "an object on a table", "an object on the floor", "an object hanging on a wall",
                 "an object floating in the air", "an object under a table", "a close object and a far object",
                 "a tall object next to a short object", "a big object and a small object", "stacked objects",
                 "a path leading into the distance", "a road to the horizon", "a frame within a frame",
                 "a centered subject", "a subject off center", "a subject filling the frame",
                 "a tiny subject in a large space"]


def general():
    out = []
    out += [f.format(c) for c in COLOURS for f in COLOUR_FORMS]
    out += [f"{p} colors" for p in COLOUR_PAIRS] + [f"a {p} object" for p in COLOUR_PAIRS]
    out += [f.format(t) for t in TEXTURES for f in TEXTURE_FORMS]
    out += [f.format(m) for m in MATERIALS for f in MATERIAL_FORMS]
    out += [f.format(s) for s in SHAPES for f in SHAPE_FORMS]
    out += [f.format(o) for o in OBJECTS for f in OBJECT_FORMS]
    out += [f"a {c} {o}" for c in COLOURS[:12] for o in COLOURED_OBJECTS]
    out += [f.format(a) for a in ANIMALS for f in ANIMAL_FORMS] + BIRD_PLACES
    out += PEOPLE
    out += [f.format(p) for p in PLACES for f in PLACE_FORMS] + PLACE_PHRASES
    out += [f.format(w) for w in WEATHER for f in WEATHER_FORMS] + WEATHER_ADJ
    out += [f.format(t) for t in TIMES for f in TIME_FORMS]
    out += [f.format(a) for a in ART for f in ART_FORMS]
    out += PHOTO
    out += [f"{n} {c}" for n in NUMBERS for c in COUNT_NOUNS] + SINGLE
    out += [f.format(p) for p in POSITIONS for f in SPATIAL_FORMS] + SPATIAL_EXTRA
    return out


# the shapes world's vocabulary (textspan.world.vocabulary()); every phrase below uses only these words
SHAPE_WORDS = ["circle", "square", "triangle", "star", "cross"]
SHAPE_COLOURS = ["red", "orange", "yellow", "purple", "white", "pink"]
SHAPE_SIZES = ["small", "large"]
H, V = ["left", "right"], ["top", "bottom"]
BG = ["water", "land"]


def _a(word):
    return "an" if word[0] in "aeiou" else "a"


def shapes():
    out = ["a photo", "an image", "a picture", "an object", "a shape", "an image of an object",
           "a picture of a shape", "there is an object", "a photo of an object", "a photo of a shape"]
    for s in SHAPE_WORDS:
        out += [f"a {s}", f"a photo of a {s}", f"an image of a {s}", f"a {s} shape", f"there is a {s}"]
    for c in SHAPE_COLOURS:
        out += [f"{_a(c)} {c} object", f"a photo of {_a(c)} {c} object", f"{_a(c)} {c} shape"]
    for z in SHAPE_SIZES:
        out += [f"a {z} object", f"a photo of a {z} object", f"a {z} shape"]
    for p in H + V:
        out += [f"an object in the {p}", f"a photo of an object in the {p}", f"a shape in the {p}"]
    for v in V:
        for h in H:
            out += [f"an object in the {v} {h}", f"a shape in the {v} {h}"]
    for b in BG:
        out += [f"an object on {b}", f"a photo of an object on {b}", f"a shape on {b}", f"a photo of {b}",
                f"an image of {b}"]
    for s in SHAPE_WORDS:
        out += [f"a {z} {s}" for z in SHAPE_SIZES] + [f"{_a(c)} {c} {s}" for c in SHAPE_COLOURS]
        out += [f"a {s} on {b}" for b in BG] + [f"a {s} in the {p}" for p in H + V]
    for c in SHAPE_COLOURS:
        out += [f"{_a(c)} {c} object on {b}" for b in BG] + [f"a {z} {c} object" for z in SHAPE_SIZES]
        out += [f"{_a(c)} {c} object in the {p}" for p in H + V]
    for z in SHAPE_SIZES:
        out += [f"a {z} object on {b}" for b in BG] + [f"a {z} object in the {p}" for p in H + V]
    return out


TEMPLATES = ["a photo of a {}", "a blurry photo of a {}", "a close-up photo of a {}", "a bright photo of a {}",
             "a dark photo of the {}", "a photo of the large {}", "a photo of the small {}", "a drawing of a {}",
             "a painting of the {}", "a sketch of a {}", "a cropped photo of the {}", "a good photo of a {}",
             "a low resolution photo of the {}", "a black and white photo of a {}", "a photo of my {}",
             "a photo of one {}", "a rendering of a {}", "a cartoon {}", "a toy {}", "art of the {}",
             "a pixelated photo of the {}", "a jpeg photo of a {}", "itap of a {}", "a {} in a photo",
             "an image showing a {}"]
SHAPES_TEMPLATES = ["a {}", "a photo of a {}", "an image of a {}", "a picture of a {}"]


def _write(name, lines):
    seen, out = set(), []
    for line in lines:
        line = " ".join(line.split())
        if line and line not in seen:
            seen.add(line)
            out.append(line)
    (HERE / name).write_text("\n".join(out) + "\n")
    return len(out)


if __name__ == "__main__":
    for name, lines in (("general.txt", general()), ("shapes.txt", shapes()), ("templates.txt", TEMPLATES),
                        ("shapes_templates.txt", SHAPES_TEMPLATES)):
        print(name, _write(name, lines))
