"""Realistic full names for synthetic patients and IDIA distractors.

IDIA ranks a patient's true name among many candidate names, so the names must look like the
names an attacker would try: common first names crossed with common surnames (as the IDIA
authors did with US census lists). Two sets of lists, chosen by ``name_lists``:

- ``"short"`` (the default until 2026-12-02): 190 first names x 188 surnames typed in here. 1,450 people share 188 surnames, so each surname token stands for
  about eight unrelated patients, and a model must learn names as token *combinations*.
- ``"census"`` (the default): Faker's ``en_US`` lists (690 first names, the 1,000 most common US surnames; the
  package is pinned so that one seed gives the same names on every machine). Most patients'
  surnames are then their own, as in a real hospital, and names are far easier to bind to a face:
  measured on one site of 1,000 patients, every parameter, 240 non-private steps, IDIA TPR 0.58
  against 0.09 with the short lists; federated over 4 sites of 250 (``nonprivate.toml``), 0.135
  against 0.023 (README, "The attack's signal").

Every name drawn here is unique within one call.
"""

from __future__ import annotations

from functools import cache

import numpy as np

DEFAULT_NAME_LISTS = "census"
NAME_LISTS: tuple[str, ...] = ("short", "census")

SHORT_FIRST_NAMES: tuple[str, ...] = (
    "James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David",
    "Elizabeth", "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah",
    "Charles", "Karen", "Christopher", "Lisa", "Daniel", "Nancy", "Matthew", "Betty", "Anthony",
    "Margaret", "Mark", "Sandra", "Donald", "Ashley", "Steven", "Kimberly", "Paul", "Emily",
    "Andrew", "Donna", "Joshua", "Michelle", "Kenneth", "Carol", "Kevin", "Amanda", "Brian",
    "Dorothy", "George", "Melissa", "Timothy", "Deborah", "Ronald", "Stephanie", "Edward",
    "Rebecca", "Jason", "Sharon", "Jeffrey", "Laura", "Ryan", "Cynthia", "Jacob", "Kathleen",
    "Gary", "Amy", "Nicholas", "Angela", "Eric", "Shirley", "Jonathan", "Anna", "Stephen",
    "Brenda", "Larry", "Pamela", "Justin", "Emma", "Scott", "Nicole", "Brandon", "Helen",
    "Benjamin", "Samantha", "Samuel", "Katherine", "Gregory", "Christine", "Alexander", "Debra",
    "Frank", "Rachel", "Patrick", "Carolyn", "Raymond", "Janet", "Jack", "Catherine", "Dennis",
    "Maria", "Jerry", "Heather", "Tyler", "Diane", "Aaron", "Ruth", "Jose", "Julie", "Adam",
    "Olivia", "Nathan", "Joyce", "Henry", "Virginia", "Douglas", "Victoria", "Zachary", "Kelly",
    "Peter", "Lauren", "Kyle", "Christina", "Ethan", "Joan", "Walter", "Evelyn", "Noah", "Judith",
    "Jeremy", "Megan", "Christian", "Andrea", "Keith", "Cheryl", "Roger", "Hannah", "Terry",
    "Jacqueline", "Gerald", "Martha", "Harold", "Gloria", "Sean", "Teresa", "Austin", "Ann",
    "Carl", "Sara", "Arthur", "Madison", "Lawrence", "Frances", "Dylan", "Kathryn", "Jesse",
    "Janice", "Jordan", "Jean", "Bryan", "Abigail", "Billy", "Alice", "Joe", "Julia", "Bruce",
    "Judy", "Gabriel", "Sophia", "Logan", "Grace", "Albert", "Denise", "Willie", "Amber",
    "Alan", "Doris", "Juan", "Marilyn", "Wayne", "Danielle", "Elijah", "Beverly", "Randy",
    "Isabella", "Roy", "Theresa", "Vincent", "Diana", "Ralph", "Natalie", "Eugene", "Brittany",
)

SHORT_SURNAMES: tuple[str, ...] = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor",
    "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez",
    "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright",
    "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green", "Adams", "Nelson", "Baker", "Hall",
    "Rivera", "Campbell", "Mitchell", "Carter", "Roberts", "Gomez", "Phillips", "Evans",
    "Turner", "Diaz", "Parker", "Cruz", "Edwards", "Collins", "Reyes", "Stewart", "Morris",
    "Morales", "Murphy", "Cook", "Rogers", "Gutierrez", "Ortiz", "Morgan", "Cooper", "Peterson",
    "Bailey", "Reed", "Kelly", "Howard", "Ramos", "Kim", "Cox", "Ward", "Richardson", "Watson",
    "Brooks", "Chavez", "Wood", "James", "Bennett", "Gray", "Mendoza", "Ruiz", "Hughes", "Price",
    "Alvarez", "Castillo", "Sanders", "Patel", "Myers", "Long", "Ross", "Foster", "Jimenez",
    "Powell", "Jenkins", "Perry", "Russell", "Sullivan", "Bell", "Coleman", "Butler",
    "Henderson", "Barnes", "Gonzales", "Fisher", "Vasquez", "Simmons", "Romero", "Jordan",
    "Patterson", "Alexander", "Hamilton", "Graham", "Reynolds", "Griffin", "Wallace", "Moreno",
    "West", "Cole", "Hayes", "Bryant", "Herrera", "Gibson", "Ellis", "Tran", "Medina", "Aguilar",
    "Stevens", "Murray", "Ford", "Castro", "Marshall", "Owens", "Harrison", "Fernandez",
    "McDonald", "Woods", "Washington", "Kennedy", "Wells", "Vargas", "Henry", "Chen", "Freeman",
    "Webb", "Tucker", "Guzman", "Burns", "Crawford", "Olson", "Simpson", "Porter", "Hunter",
    "Gordon", "Mendez", "Silva", "Shaw", "Snyder", "Mason", "Dixon", "Munoz", "Hunt", "Hicks",
    "Holmes", "Palmer", "Wagner", "Black", "Robertson", "Boyd", "Rose", "Stone", "Salazar",
    "Fox", "Warren", "Mills", "Meyer", "Rice", "Schmidt", "Garza", "Daniels", "Ferguson",
)


def check_name_lists(name: str, *, key: str = "name_lists") -> str:
    if name not in NAME_LISTS:
        raise ValueError(f"{key}: expected one of {list(NAME_LISTS)}, got {name!r}")
    return name


@cache
def _census() -> tuple[tuple[str, ...], tuple[str, ...]]:
    # imported on first use only (0.06-0.2 s), not by every process that imports this module
    from faker.providers.person.en_US import Provider

    return tuple(dict.fromkeys(Provider.first_names)), tuple(dict.fromkeys(Provider.last_names))


def first_and_surnames(lists: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The first names and surnames of one set of lists."""
    if check_name_lists(lists, key="lists") == "census":
        return _census()
    return SHORT_FIRST_NAMES, SHORT_SURNAMES


def draw_unique_names(rng: np.random.Generator, count: int, *, exclude: set[str] | None = None,
                      lists: str = DEFAULT_NAME_LISTS) -> list[str]:
    """Draw ``count`` distinct "First Last" names from ``lists``, none of them in ``exclude``."""
    firsts, surnames = first_and_surnames(lists)
    taken = set(exclude or ())
    capacity = len(firsts) * len(surnames) - len(taken)
    if count > capacity:
        raise ValueError(f"count: asked for {count} unique names but only {capacity} are available")
    names: list[str] = []
    while len(names) < count:
        name = f"{firsts[rng.integers(len(firsts))]} {surnames[rng.integers(len(surnames))]}"
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names
